//! Compiles the CUDA kernels (`kernels/*.cu`) into fatbins embedded in the crate.
//!
//! nvcc is looked up in order: `$NVCC`, `<repo>/.nvcc/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc`
//! (made by `scripts/install_nvcc.sh`), `nvcc` on `PATH`, `/usr/local/cuda/bin/nvcc`.
//! Each `kernels/<family>.cu` becomes `OUT_DIR/<family>.fatbin` holding SASS for every card in
//! [`SASS_ARCHS`] (sm_80 A100; sm_86 RTX 30xx, A6000; sm_89 RTX 40xx, L40S; sm_90 H100/H200;
//! sm_120 RTX 50xx) plus compute_80 PTX, which any newer card (sm_100, sm_103, sm_110, ...) JITs.
//! One nvcc per file with two front-end passes: compute_90 for the sm_90 SASS (the code the
//! Hopper benchmarks measured), compute_80 for everything else, so the pre-Hopper SASS and the
//! PTX come from one and the same PTX (`TOPCOAT_KERNELS=generic` runs that PTX on a Hopper card).
//! PTX only from nvcc 13.0: PTX ISA 9.0 JITs on driver 580, newer PTX does not.
//!
//! `OUT_DIR/kernels.rs` (included by `src/backend/cuda/kernels.rs`) names every kernel: build.rs
//! reads each `kernels/<family>.cu` for its `extern "C" __global__` functions (written out or
//! made by a one-parameter macro such as `ATTENTION_MMA_KERNELS(32)`) and emits, per family, a
//! `pub mod <family>` holding one `Kernel` constant per function (`LAYERNORM_FORWARD_BF16` for
//! `layernorm_forward_bf16`), `KERNELS` (all of them) and `MODULE` (the family, its fatbin and
//! its kernels), then `MODULES`, every family, and what the fatbins were asked to hold
//! (`SASS_ARCHS`, `PTX_ARCHS`, `NVCC_VERSION`). With nvcc the names read are checked against the
//! entry functions ptxas compiled, for every arch. `ptxas -v` register, shared memory and spill
//! figures go to `OUT_DIR/ptxas_report.txt`, one line per kernel and arch, and a spill in any
//! arch becomes a cargo warning.
//!
//! Without nvcc the build succeeds CPU-only, with a warning: the same constants, every fatbin
//! empty. A kernel that does not compile fails the build. See docs/BUILD.md.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The cards the fatbins hold machine code for, oldest first.
const SASS_ARCHS: [u32; 5] = [80, 86, 89, 90, 120];
/// The SASS compiled from the compute_90 front end (the rest come from compute_80).
const HOPPER: u32 = 90;
/// The PTX every fatbin carries for cards newer than those above (JIT by the driver).
const PTX_ARCH: u32 = 80;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(topcoat_kernels)");
    println!("cargo:rerun-if-env-changed=NVCC");
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed={}", kdir.display());

    let mut sources = Vec::new();
    for entry in fs::read_dir(&kdir).into_iter().flatten().flatten() {
        let path = entry.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext == "cu" || ext == "cuh" {
            println!("cargo:rerun-if-changed={}", path.display());
        }
        if ext == "cu" {
            sources.push(path);
        }
    }
    sources.sort();
    let families: Vec<Family> = sources.iter().map(|src| Family::read(src)).collect();
    check_unique(&families);

    let Some(nvcc) = find_nvcc(&root) else {
        println!("cargo:warning=nvcc not found: building a CPU-only topcoat (set NVCC or run scripts/install_nvcc.sh)");
        write_table(&out, &families, None);
        return;
    };
    println!("cargo:rerun-if-changed={}", nvcc.display());

    let version = nvcc_version(&nvcc);
    let known = nvcc_gpu_codes(&nvcc);
    let sass: Vec<u32> = SASS_ARCHS
        .into_iter()
        .filter(|a| {
            let ok = known.contains(&format!("sm_{a}"));
            if !ok {
                println!("cargo:warning=nvcc {version} cannot compile for sm_{a}: no SASS for it");
            }
            ok
        })
        .collect();
    let ptx: Vec<u32> = if version.starts_with("13.0") {
        vec![PTX_ARCH]
    } else {
        println!("cargo:warning=nvcc {version} is not 13.0: embedding SASS only, no PTX (PTX newer than 13.0 does not JIT on driver 580)");
        Vec::new()
    };
    let gencode = gencode_args(&sass, &ptx);

    // One nvcc per file, in parallel; results come back in sorted order.
    let started = Instant::now();
    let results: Result<Vec<(String, PathBuf, String)>, String> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| s.spawn(|| compile(&nvcc, &gencode, &kdir, src, &out)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let results = results.unwrap_or_else(|err| panic!("{err}"));
    let seconds = started.elapsed().as_secs_f64();

    let mut report = format!(
        "# ptxas -v, nvcc {version}, {}\n# {} files compiled in {seconds:.1} s (wall, in parallel)\n",
        gencode.join(" "),
        sources.len()
    );
    for ((family, _, log), read) in results.iter().zip(&families) {
        let compiled = ptxas_summary(family, log, &mut report);
        check_entries(read, &sass, compiled);
    }
    fs::write(out.join("ptxas_report.txt"), report).unwrap();
    let fatbins: Vec<PathBuf> = results.into_iter().map(|(_, p, _)| p).collect();
    let built = Built {
        fatbins,
        sass,
        ptx,
        version,
    };
    write_table(&out, &families, Some(&built));
    println!("cargo:rustc-cfg=topcoat_kernels");
}

/// The `-gencode` arguments: the sm_90 SASS from the compute_90 front end, every other SASS
/// and the PTX from compute_80 (one front-end pass each).
fn gencode_args(sass: &[u32], ptx: &[u32]) -> Vec<String> {
    let mut args = Vec::new();
    let mut generic: Vec<String> = sass
        .iter()
        .filter(|&&a| a != HOPPER)
        .map(|a| format!("sm_{a}"))
        .collect();
    generic.extend(ptx.iter().map(|a| format!("compute_{a}")));
    if !generic.is_empty() {
        args.push("-gencode".into());
        args.push(format!(
            "arch=compute_{PTX_ARCH},code=[{}]",
            generic.join(",")
        ));
    }
    if sass.contains(&HOPPER) {
        args.push("-gencode".into());
        args.push(format!("arch=compute_{HOPPER},code=sm_{HOPPER}"));
    }
    args
}

/// What an nvcc build put in the fatbins.
struct Built {
    fatbins: Vec<PathBuf>,
    sass: Vec<u32>,
    ptx: Vec<u32>,
    version: String,
}

/// The first nvcc that exists, in the order given in the header.
fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "NVCC={} does not exist", p.display());
        return Some(p);
    }
    let mut venv: Vec<PathBuf> = fs::read_dir(root.join(".nvcc/lib"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("site-packages/nvidia/cu13/bin/nvcc"))
        .filter(|p| p.is_file())
        .collect();
    venv.sort();
    let on_path = env::var_os("PATH")
        .into_iter()
        .flat_map(|p| env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("nvcc"))
        .find(|p| p.is_file());
    venv.pop()
        .or(on_path)
        .or_else(|| Some(PathBuf::from("/usr/local/cuda/bin/nvcc")).filter(|p| p.is_file()))
}

/// "13.0" from the "release 13.0, V13.0.88" line of `nvcc --version`.
fn nvcc_version(nvcc: &Path) -> String {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} --version: {e}", nvcc.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("release ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| {
            panic!(
                "{} --version: no release number in:\n{text}",
                nvcc.display()
            )
        })
        .to_string()
}

/// The real architectures nvcc can compile for (`nvcc --list-gpu-code`: `sm_80`, ...).
fn nvcc_gpu_codes(nvcc: &Path) -> Vec<String> {
    let out = Command::new(nvcc)
        .arg("--list-gpu-code")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} --list-gpu-code: {e}", nvcc.display()));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Compiles one `.cu` file into (family, fatbin path, nvcc output holding the ptxas log), or
/// nvcc's error output.
fn compile(
    nvcc: &Path,
    gencode: &[String],
    kdir: &Path,
    src: &Path,
    out: &Path,
) -> Result<(String, PathBuf, String), String> {
    let family = src.file_stem().unwrap().to_string_lossy().into_owned();
    let fatbin = out.join(format!("{family}.fatbin"));
    let output = Command::new(nvcc)
        .args(gencode)
        .args([
            "-O3",
            "--use_fast_math",
            "-std=c++17",
            "-Xptxas",
            "-v",
            "--fatbin",
        ])
        .arg("-I")
        .arg(kdir)
        .arg("-o")
        .arg(&fatbin)
        .arg(src)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let log = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let status = output.status;
        return Err(format!(
            "nvcc failed on {} ({status}):\n{log}",
            src.display()
        ));
    }
    Ok((family, fatbin, log))
}

/// Appends one line per kernel and arch to `report` (`<family> <kernel> sm_80: Used ...`);
/// warns on any spill, naming the arch. Returns the `(kernel, arch)` pairs ptxas compiled.
fn ptxas_summary(family: &str, log: &str, report: &mut String) -> Vec<(String, u32)> {
    let mut at = String::from("?");
    let mut entries = Vec::new();
    for line in log.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("ptxas info    : Compiling entry function '") {
            // "<name>' for 'sm_80'"
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or("?").to_string();
            let arch = parts.nth(1).unwrap_or("sm_?").to_string();
            let number = arch.trim_start_matches("sm_").parse().unwrap_or_else(|_| {
                panic!("kernels/{family}.cu: ptxas compiled {kernel} for an arch it did not name: {line}")
            });
            at = format!("{kernel} {arch}");
            entries.push((kernel, number));
        } else if line.contains("bytes spill stores") {
            let spills: Vec<u64> = line
                .split(',')
                .filter(|f| f.contains("spill"))
                .filter_map(|f| f.split_whitespace().next()?.parse().ok())
                .collect();
            if spills.iter().any(|&b| b != 0) {
                println!(
                    "cargo:warning=register spill in kernel {at} (kernels/{family}.cu): {line}"
                );
            }
            writeln!(report, "{family} {at}: {line}").unwrap();
        } else if let Some(rest) = line.strip_prefix("ptxas info    : Used ") {
            writeln!(report, "{family} {at}: Used {rest}").unwrap();
        }
    }
    entries
}

/// One `kernels/<family>.cu`: its name and its `extern "C" __global__` functions.
struct Family {
    name: String,
    kernels: Vec<String>,
}

impl Family {
    fn read(src: &Path) -> Family {
        let name = src.file_stem().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(src)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
        let kernels = entry_names(&text);
        assert!(
            !kernels.is_empty(),
            "kernels/{name}.cu: no extern \"C\" __global__ function found"
        );
        Family { name, kernels }
    }
}

const ENTRY: &str = "extern \"C\" __global__";

/// The kernels a `.cu` source defines: each `extern "C" __global__` function written out, in
/// source order, then each one a `#define MACRO(P)` body makes (a name pasted with `##P##`)
/// once per top-level `MACRO(arg)` line.
fn entry_names(text: &str) -> Vec<String> {
    let joined = strip_comments(text).replace("\\\n", " ");
    let mut macros: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut plain = String::new();
    let mut made = Vec::new();
    for line in joined.lines() {
        let line = line.trim();
        if let Some(def) = line.strip_prefix("#define") {
            let def = def.trim_start();
            let Some((head, body)) = def.split_once(')') else {
                continue;
            };
            let Some((macro_name, param)) = head.split_once('(') else {
                continue;
            };
            let templates = entries_in(body);
            if !templates.is_empty() {
                macros.push((macro_name.trim().into(), param.trim().into(), templates));
            }
            continue;
        }
        plain.push_str(line);
        plain.push('\n');
        for (macro_name, param, templates) in &macros {
            let Some(arg) = line
                .strip_prefix(macro_name.as_str())
                .and_then(|rest| rest.trim_start().strip_prefix('('))
                .and_then(|rest| rest.split_once(')'))
                .map(|(arg, _)| arg.trim())
            else {
                continue;
            };
            for template in templates {
                let pasted: String = template
                    .split("##")
                    .map(|piece| if piece == param { arg } else { piece })
                    .collect();
                made.push(pasted);
            }
        }
    }
    let mut names = entries_in(&plain);
    names.extend(made);
    names
}

/// The function names after each `extern "C" __global__` in `text`: the first identifier
/// followed by `(` other than `void` and `__launch_bounds__(...)`.
fn entries_in(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in text.match_indices(ENTRY) {
        let mut rest = &text[at + ENTRY.len()..];
        loop {
            rest = rest.trim_start();
            let len = rest
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_' || ch == '#'))
                .unwrap_or(rest.len());
            let (word, after) = rest.split_at(len);
            if word == "__launch_bounds__" {
                let close = after.find(')').expect("__launch_bounds__ without ')'");
                rest = &after[close + 1..];
            } else if after.trim_start().starts_with('(') && !word.is_empty() {
                names.push(word.to_string());
                break;
            } else if word.is_empty() {
                break;
            } else {
                rest = after;
            }
        }
    }
    names
}

/// `text` without `//` and `/* */` comments (kernel sources hold no string literals with them).
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('/') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("//") {
            rest = tail.find('\n').map_or("", |j| &tail[j..]);
        } else if let Some(inner) = tail.strip_prefix("/*") {
            rest = inner.find("*/").map_or("", |j| &inner[j + 2..]);
        } else {
            out.push('/');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Kernel names are unique across families (the backend finds a function by its name).
fn check_unique(families: &[Family]) {
    let mut seen = std::collections::HashMap::new();
    for family in families {
        for kernel in &family.kernels {
            if let Some(other) = seen.insert(kernel.as_str(), family.name.as_str()) {
                panic!(
                    "kernel {kernel} is defined in kernels/{other}.cu and kernels/{}.cu",
                    family.name
                );
            }
        }
    }
}

/// The names read from the source must be exactly the entry functions ptxas compiled, for
/// every arch in `sass`.
fn check_entries(family: &Family, sass: &[u32], compiled: Vec<(String, u32)>) {
    let mut read = family.kernels.clone();
    read.sort();
    for &arch in sass {
        let mut names: Vec<String> = compiled
            .iter()
            .filter(|(_, a)| *a == arch)
            .map(|(k, _)| k.clone())
            .collect();
        names.sort();
        assert_eq!(
            read, names,
            "kernels/{}.cu: the kernel names build.rs read (left) differ from those ptxas compiled for sm_{arch} (right)",
            family.name
        );
    }
}

/// Writes `OUT_DIR/kernels.rs`: per family a module of `Kernel` constants, `KERNELS` and
/// `MODULE` (with its fatbin from `built`, or empty bytes in a CPU-only build), then
/// `MODULES`, `SASS_ARCHS`, `PTX_ARCHS` and `NVCC_VERSION`.
fn write_table(out: &Path, families: &[Family], built: Option<&Built>) {
    let mut rs = String::from("// Written by build.rs from kernels/*.cu: do not edit.\n");
    for (i, family) in families.iter().enumerate() {
        let name = &family.name;
        let bytes = match built {
            Some(b) => format!("include_bytes!({:?})", b.fatbins[i].display().to_string()),
            None => "&[]".to_string(),
        };
        writeln!(rs, "\n/// The kernels of `kernels/{name}.cu`.").unwrap();
        writeln!(
            rs,
            "pub mod {name} {{\n    use super::{{Kernel, Module}};\n"
        )
        .unwrap();
        let mut consts = Vec::new();
        for kernel in &family.kernels {
            let konst = kernel.to_ascii_uppercase();
            writeln!(rs, "    /// `{kernel}`.").unwrap();
            writeln!(
                rs,
                "    pub const {konst}: Kernel = Kernel {{ module: {name:?}, name: {kernel:?} }};"
            )
            .unwrap();
            consts.push(konst);
        }
        writeln!(
            rs,
            "\n    /// Every kernel of this family, in source order."
        )
        .unwrap();
        writeln!(
            rs,
            "    pub const KERNELS: &[Kernel] = &[{}];",
            consts.join(", ")
        )
        .unwrap();
        writeln!(
            rs,
            "\n    /// This family's fatbin (empty in a build without nvcc)."
        )
        .unwrap();
        writeln!(
            rs,
            "    pub const MODULE: Module = Module {{ family: {name:?}, fatbin: {bytes}, kernels: KERNELS }};"
        )
        .unwrap();
        rs.push_str("}\n");
    }
    let all: Vec<String> = families
        .iter()
        .map(|f| format!("{}::MODULE", f.name))
        .collect();
    writeln!(rs, "\n/// Every family, sorted by name.").unwrap();
    writeln!(rs, "pub const MODULES: &[Module] = &[{}];", all.join(", ")).unwrap();
    let (sass, ptx, version) = match built {
        Some(b) => (b.sass.clone(), b.ptx.clone(), b.version.as_str()),
        None => (Vec::new(), Vec::new(), ""),
    };
    writeln!(
        rs,
        "\n/// The SASS archs every fatbin was compiled for (`80` = sm_80; empty without nvcc)."
    )
    .unwrap();
    writeln!(rs, "pub const SASS_ARCHS: &[u32] = &{sass:?};").unwrap();
    writeln!(
        rs,
        "/// The PTX every fatbin carries for newer cards (`80` = compute_80; empty without nvcc)."
    )
    .unwrap();
    writeln!(rs, "pub const PTX_ARCHS: &[u32] = &{ptx:?};").unwrap();
    writeln!(
        rs,
        "/// The nvcc release that built the fatbins (`13.0`; empty without nvcc)."
    )
    .unwrap();
    writeln!(rs, "pub const NVCC_VERSION: &str = {version:?};").unwrap();
    fs::write(out.join("kernels.rs"), rs).unwrap();
}
