//! Compiles the CUDA kernels (`kernels/*.cu`) into fatbins embedded in the crate.
//!
//! nvcc is looked up in order: `$NVCC`, `<repo>/.nvcc/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc`
//! (made by `scripts/install_nvcc.sh`), `nvcc` on `PATH`, `/usr/local/cuda/bin/nvcc`.
//! Each `kernels/<family>.cu` becomes `OUT_DIR/<family>.fatbin` holding sm_90 SASS plus
//! compute_90 PTX (PTX only from nvcc 13.0: newer PTX does not JIT on driver 580).
//!
//! `OUT_DIR/kernels.rs` (included by `src/backend/cuda/kernels.rs`) names every kernel: build.rs
//! reads each `kernels/<family>.cu` for its `extern "C" __global__` functions (written out or
//! made by a one-parameter macro such as `ATTENTION_MMA_KERNELS(32)`) and emits, per family, a
//! `pub mod <family>` holding one `Kernel` constant per function (`LAYERNORM_FORWARD_BF16` for
//! `layernorm_forward_bf16`), `KERNELS` (all of them) and `MODULE` (the family, its fatbin and
//! its kernels), then `MODULES`, every family. With nvcc the names read are checked against the
//! entry functions ptxas compiled. `ptxas -v` register, shared memory and spill figures go to
//! `OUT_DIR/ptxas_report.txt`, and any spill becomes a cargo warning.
//!
//! Without nvcc the build succeeds CPU-only, with a warning: the same constants, every fatbin
//! empty. A kernel that does not compile fails the build. See docs/BUILD.md.

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
    let families: Vec<Family> = sources.iter().map(|src| Family::read(src)).collect();
    check_unique(&families);

    let Some(nvcc) = find_nvcc(&root) else {
        println!("cargo:warning=nvcc not found: building a CPU-only topcoat (set NVCC or run scripts/install_nvcc.sh)");
        write_table(&out, &families, None);
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
    for ((family, _, log), read) in results.iter().zip(&families) {
        let compiled = ptxas_summary(family, log, &mut report);
        check_entries(read, compiled);
    }
    fs::write(out.join("ptxas_report.txt"), report).unwrap();
    let fatbins: Vec<PathBuf> = results.into_iter().map(|(_, p, _)| p).collect();
    write_table(&out, &families, Some(&fatbins));
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

/// Appends one line per kernel to `report`; warns on any spill. Returns the entry functions
/// ptxas compiled.
fn ptxas_summary(family: &str, log: &str, report: &mut String) -> Vec<String> {
    let mut kernel = String::from("?");
    let mut entries = Vec::new();
    for line in log.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("ptxas info    : Compiling entry function '") {
            kernel = rest.split('\'').next().unwrap_or("?").to_string();
            entries.push(kernel.clone());
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

/// The names read from the source must be exactly the entry functions ptxas compiled.
fn check_entries(family: &Family, mut compiled: Vec<String>) {
    let mut read = family.kernels.clone();
    read.sort();
    compiled.sort();
    assert_eq!(
        read, compiled,
        "kernels/{}.cu: the kernel names build.rs read (left) differ from those ptxas compiled (right)",
        family.name
    );
}

/// Writes `OUT_DIR/kernels.rs`: per family a module of `Kernel` constants, `KERNELS` and
/// `MODULE` (with the fatbin from `fatbins`, or empty bytes in a CPU-only build), then
/// `MODULES`.
fn write_table(out: &Path, families: &[Family], fatbins: Option<&[PathBuf]>) {
    let mut rs = String::from("// Written by build.rs from kernels/*.cu: do not edit.\n");
    for (i, family) in families.iter().enumerate() {
        let name = &family.name;
        let bytes = match fatbins {
            Some(paths) => format!("include_bytes!({:?})", paths[i].display().to_string()),
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
    fs::write(out.join("kernels.rs"), rs).unwrap();
}
