//! Compiles the CUDA kernels (`kernels/*.cu`) into fatbins embedded in the crate.
//!
//! nvcc is looked up in order: `$NVCC`, `<repo>/.nvcc/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc`
//! (made by `scripts/install_nvcc.sh`), `nvcc` on `PATH`, `/usr/local/cuda/bin/nvcc`.
//! Each `kernels/<family>.cu` becomes `OUT_DIR/<family>.fatbin` holding sm_90 SASS plus
//! compute_90 PTX (PTX only from nvcc 13.0: newer PTX does not JIT on driver 580). The table
//! `OUT_DIR/kernels.rs` lists `(family, bytes)` pairs; `ptxas -v` register, shared memory and
//! spill figures go to `OUT_DIR/ptxas_report.txt`, and any spill becomes a cargo warning.
//! Without nvcc the build succeeds CPU-only: an empty table and a warning. A kernel that does not
//! compile fails the build. See docs/BUILD.md.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

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

    let Some(nvcc) = find_nvcc(&root) else {
        println!("cargo:warning=nvcc not found: building a CPU-only topcoat (set NVCC or run scripts/install_nvcc.sh)");
        write_table(&out, &[]);
        return;
    };
    println!("cargo:rerun-if-changed={}", nvcc.display());

    let version = nvcc_version(&nvcc);
    let code = if version.starts_with("13.0") {
        "[sm_90,compute_90]"
    } else {
        println!("cargo:warning=nvcc {version} is not 13.0: embedding sm_90 SASS only, no PTX (PTX newer than 13.0 does not JIT on driver 580)");
        "sm_90"
    };

    // One nvcc per file, in parallel; results come back in sorted order.
    let results: Result<Vec<(String, PathBuf, String)>, String> = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| s.spawn(|| compile(&nvcc, code, &kdir, src, &out)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let results = results.unwrap_or_else(|err| panic!("{err}"));

    let mut report = format!("# ptxas -v, nvcc {version}, -gencode arch=compute_90,code={code}\n");
    for (family, _, log) in &results {
        ptxas_summary(family, log, &mut report);
    }
    fs::write(out.join("ptxas_report.txt"), report).unwrap();
    let table: Vec<(String, PathBuf)> = results.into_iter().map(|(f, p, _)| (f, p)).collect();
    write_table(&out, &table);
    println!("cargo:rustc-cfg=topcoat_kernels");
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

/// Compiles one `.cu` file into (family, fatbin path, nvcc output holding the ptxas log), or
/// nvcc's error output.
fn compile(
    nvcc: &Path,
    code: &str,
    kdir: &Path,
    src: &Path,
    out: &Path,
) -> Result<(String, PathBuf, String), String> {
    let family = src.file_stem().unwrap().to_string_lossy().into_owned();
    let fatbin = out.join(format!("{family}.fatbin"));
    let output = Command::new(nvcc)
        .args(["-gencode", &format!("arch=compute_90,code={code}")])
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

/// Appends one line per kernel to `report`; warns on any spill.
fn ptxas_summary(family: &str, log: &str, report: &mut String) {
    let mut kernel = String::from("?");
    for line in log.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("ptxas info    : Compiling entry function '") {
            kernel = rest.split('\'').next().unwrap_or("?").to_string();
        } else if line.contains("bytes spill stores") {
            let spills: Vec<u64> = line
                .split(',')
                .filter(|f| f.contains("spill"))
                .filter_map(|f| f.split_whitespace().next()?.parse().ok())
                .collect();
            if spills.iter().any(|&b| b != 0) {
                println!(
                    "cargo:warning=register spill in kernel {kernel} (kernels/{family}.cu): {line}"
                );
            }
            writeln!(report, "{family} {kernel}: {line}").unwrap();
        } else if let Some(rest) = line.strip_prefix("ptxas info    : Used ") {
            writeln!(report, "{family} {kernel}: Used {rest}").unwrap();
        }
    }
}

/// Writes `OUT_DIR/kernels.rs`: `KERNELS`, the (family, fatbin bytes) table.
fn write_table(out: &Path, fatbins: &[(String, PathBuf)]) {
    let mut rs = String::from("/// (family, fatbin) for every kernels/<family>.cu, sorted.\n");
    rs.push_str("pub const KERNELS: &[(&str, &[u8])] = &[\n");
    for (family, path) in fatbins {
        writeln!(
            rs,
            "    ({family:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    rs.push_str("];\n");
    fs::write(out.join("kernels.rs"), rs).unwrap();
}
