//! The kernel code this build carries for each card: the fatbin parser against real nvcc output
//! (the committed fixture of `kernels/fill.cu`, made by scripts/make_fatbin_fixture.sh with
//! build.rs's flags), then every embedded family: SASS for each listed arch and the PTX that
//! newer cards JIT, at a PTX version driver 580 accepts. A build without nvcc embeds empty
//! fatbins and says "skipped: built without nvcc".

use topcoat::backend::cuda::fatbin::{CodeKind, Fatbin};
use topcoat::backend::cuda::kernels::{MODULES, NVCC_VERSION, PTX_ARCHS, SASS_ARCHS};
use topcoat::backend::cuda::{arch, BuildCode, KernelCode, KernelVariants, BUILT_WITH_NVCC};

/// The cards of the workstation issue: sm_80 (A100), sm_86 (RTX 30xx, A6000), sm_89 (RTX 40xx,
/// L40S), sm_90 (H100/H200), sm_120 (RTX 50xx).
const LISTED_SASS: [u32; 5] = [80, 86, 89, 90, 120];
/// The PTX: compute_80, JIT-compiled by cards without SASS here (sm_100, sm_103, sm_110, ...).
const LISTED_PTX: [u32; 1] = [80];
/// PTX ISA 9.0 (nvcc 13.0) is the newest that driver 580 JITs (docs/BUILD.md).
const MAX_PTX_ISA: (u16, u16) = (9, 0);
/// `e_machine` of a CUDA cubin.
const EM_CUDA: u16 = 190;

const FIXTURE: &[u8] = include_bytes!("fixtures/fatbin/fill.fatbin");
const FIXTURE_PTX_ONLY: &[u8] = include_bytes!("fixtures/fatbin/fill_ptx.fatbin");

/// The SM a CUDA 13 cubin names in its ELF header (`e_flags` bits 8..16), after checking that
/// it is a 64-bit CUDA ELF.
fn elf_sm(elf: &[u8]) -> u32 {
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "not a 64-bit ELF");
    let machine = u16::from_le_bytes([elf[18], elf[19]]);
    assert_eq!(machine, EM_CUDA, "e_machine");
    let flags = u32::from_le_bytes(elf[48..52].try_into().unwrap());
    (flags >> 8) & 0xff
}

/// Every check a fatbin of this build must pass: the listed SASS, each an ELF for its own arch,
/// and the listed PTX at an ISA driver 580 JITs. `name` says which fatbin failed.
fn check_fatbin(name: &str, fb: &Fatbin, ptx: &[u32]) {
    assert_eq!(fb.sass_archs(), LISTED_SASS, "{name}: SASS");
    assert_eq!(fb.ptx_archs(), ptx, "{name}: PTX");
    for e in &fb.entries {
        match e.kind {
            CodeKind::Sass => {
                assert!(!e.compressed, "{name}: {e} compressed");
                assert_eq!(
                    elf_sm(e.payload),
                    e.arch,
                    "{name}: {e}: its ELF names another SM"
                );
            }
            CodeKind::Ptx => {
                assert!(
                    e.version <= MAX_PTX_ISA,
                    "{name}: {e}: driver 580 JITs ISA 9.0 at most"
                )
            }
        }
    }
    assert_eq!(
        fb.entries.len(),
        LISTED_SASS.len() + ptx.len(),
        "{name}: one entry per arch"
    );
}

#[test]
fn parser_reads_a_real_nvcc_fatbin() {
    let fb = Fatbin::parse(FIXTURE).unwrap();
    check_fatbin("fixtures/fatbin/fill.fatbin", &fb, &LISTED_PTX);
    let ptx = fb.entries.iter().find(|e| e.kind == CodeKind::Ptx).unwrap();
    assert_eq!(ptx.version, (9, 0));
    // nvcc compresses PTX (zstd) and leaves SASS as it is.
    assert!(ptx.compressed);
    assert!(
        ptx.payload.starts_with(b"\x28\xb5\x2f\xfd"),
        "zstd frame magic"
    );
    assert_eq!(ptx.to_string(), "compute_80 PTX (ISA 9.0)");
    // The PTX-only copy is byte for byte what nvcc writes for `code=compute_80`.
    assert_eq!(fb.ptx_only().unwrap(), FIXTURE_PTX_ONLY);
    let only = Fatbin::parse(FIXTURE_PTX_ONLY).unwrap();
    assert_eq!(only.sass_archs(), Vec::<u32>::new());
    assert_eq!(only.ptx_archs(), LISTED_PTX);
}

#[test]
fn every_family_holds_every_listed_arch() {
    if !BUILT_WITH_NVCC {
        println!("skipped: built without nvcc");
        assert!(MODULES.iter().all(|m| m.fatbin.is_empty()));
        assert!(SASS_ARCHS.is_empty() && PTX_ARCHS.is_empty() && NVCC_VERSION.is_empty());
        return;
    }
    assert_eq!(SASS_ARCHS, LISTED_SASS, "build.rs's list");
    // build.rs embeds PTX only from nvcc 13.0 (newer PTX does not JIT on driver 580).
    let ptx: &[u32] = if NVCC_VERSION.starts_with("13.0") {
        &LISTED_PTX
    } else {
        println!("nvcc {NVCC_VERSION}: no PTX embedded");
        &[]
    };
    assert_eq!(PTX_ARCHS, ptx, "build.rs's list");
    for m in MODULES {
        let name = format!("kernels/{}.cu", m.family);
        let fb = Fatbin::parse(m.fatbin).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_fatbin(&name, &fb, ptx);
        println!(
            "{name}: {} bytes, {} entries",
            m.fatbin.len(),
            fb.entries.len()
        );
    }
    let code = BuildCode::of(MODULES).unwrap();
    assert_eq!(code.sass, LISTED_SASS);
    // What each card of the issue runs from this build.
    for (cc, want) in [
        ((8, 0), "sm_80 SASS"),
        ((8, 6), "sm_86 SASS"),
        ((8, 9), "sm_89 SASS"),
        ((9, 0), "sm_90 SASS"),
        ((12, 0), "sm_120 SASS"),
    ] {
        let got = arch::choose("card", cc, &code, KernelVariants::Auto).unwrap();
        assert_eq!(got.to_string(), want, "{cc:?}");
    }
    if !ptx.is_empty() {
        assert_eq!(
            arch::choose("H100", (9, 0), &code, KernelVariants::Generic),
            Ok(KernelCode::PtxJit {
                compute: 80,
                forced: true
            })
        );
    }
}

/// Runs `topcoat args...` with `TOPCOAT_KERNELS` set to `kernels` (or unset).
fn topcoat(args: &[&str], kernels: Option<&str>) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_topcoat"));
    cmd.args(args).env_remove("TOPCOAT_KERNELS");
    if let Some(k) = kernels {
        cmd.env("TOPCOAT_KERNELS", k);
    }
    cmd.output().expect("running topcoat")
}

/// `info` ends with what the build holds and what the card here runs (or why there is none).
#[test]
fn info_names_the_kernel_code_and_the_device() {
    let out = topcoat(&["info", "--n-layer", "2"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let want = if BUILT_WITH_NVCC {
        "kernels: nvcc 13.0, SASS for sm_80, sm_86, sm_89, sm_90, sm_120; PTX for compute_80\n"
    } else {
        "kernels: none (built without nvcc: CPU only)\n"
    };
    if BUILT_WITH_NVCC && !NVCC_VERSION.starts_with("13.0") {
        println!("skipped the kernels line: nvcc {NVCC_VERSION}");
    } else {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    let device = text
        .lines()
        .find_map(|l| l.strip_prefix("cuda device: "))
        .unwrap_or_else(|| panic!("no device line in\n{text}"));
    println!("cuda device: {device}");
    match topcoat::backend::cuda::probe() {
        Ok(info) => {
            assert!(device.starts_with(&info.to_string()), "{device}");
            assert!(device.contains("compute capability"), "{device}");
            assert!(device.contains(", kernels: "), "{device}");
        }
        Err(e) => assert_eq!(device, format!("none ({e})")),
    }
    // The generic variants, named as such where a card has SASS that would otherwise run.
    let out = topcoat(&["info", "--n-layer", "2"], Some("generic"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    if let Ok(info) = topcoat::backend::cuda::probe() {
        if info.compute_capability.0 != 10 && info.compute_capability.0 != 11 {
            let line = "kernels: PTX JIT from compute_80, generic variants (TOPCOAT_KERNELS)";
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
    }
}

/// A `TOPCOAT_KERNELS` it does not know is refused by name before anything is printed.
#[test]
fn an_unknown_topcoat_kernels_is_named() {
    let out = topcoat(&["info", "--n-layer", "2"], Some("hopper"));
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown TOPCOAT_KERNELS `hopper`: expected auto or generic"),
        "{err}"
    );
}
