//! Finding the NCCL library before cudarc does: cudarc 0.19 dlopens `libnccl.so` (and a few
//! versioned names, [`nccl_library_candidates`]) and panics when none opens, while NCCL's own
//! packages and wheels ship only `libnccl.so.2`. [`check_nccl_loadable`] turns that into an
//! error that says what to do; [`ensure_libnccl_symlink`] is the fix a launcher applies for the
//! ranks it starts (a folder holding `libnccl.so -> .../libnccl.so.2`, put on their
//! LD_LIBRARY_PATH: the dynamic loader reads that variable when a process starts, so it helps
//! child processes, not the one that sets it).

use std::ffi::{CStr, CString};
use std::io;
use std::path::{Path, PathBuf};

/// The name NCCL ships (its SONAME), which cudarc never tries.
pub const NCCL_SONAME: &str = "libnccl.so.2";

/// The file names cudarc tries, in its order.
pub fn nccl_library_candidates() -> Vec<String> {
    cudarc::get_lib_name_candidates("nccl")
}

/// A dlopen'ed library, closed on drop.
struct Handle(*mut libc::c_void);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful dlopen and is closed once.
        unsafe { libc::dlclose(self.0) };
    }
}

fn dlopen(name: &str) -> Option<Handle> {
    let c = CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; RTLD_LAZY|RTLD_LOCAL loads without exporting symbols.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
    // Not `then_some(Handle(h))`: that builds (and drops, so dlcloses) a null handle too.
    if h.is_null() {
        None
    } else {
        Some(Handle(h))
    }
}

/// The path of the file `handle` was loaded from, found through one of its symbols.
fn loaded_path(handle: &Handle, symbol: &CStr) -> Option<PathBuf> {
    // SAFETY: dlsym/dladdr only read the loader's tables; dli_fname is a NUL-terminated string
    // owned by the loader while the library stays open (it does: we hold the handle).
    unsafe {
        let sym = libc::dlsym(handle.0, symbol.as_ptr());
        if sym.is_null() {
            return None;
        }
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(sym, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        let s = CStr::from_ptr(info.dli_fname).to_str().ok()?;
        Some(PathBuf::from(s))
    }
}

/// Where `libnccl.so.2` loads from on this machine, if it does.
pub fn find_libnccl_so2() -> Option<PathBuf> {
    let h = dlopen(NCCL_SONAME)?;
    loaded_path(&h, c"ncclGetVersion")
}

/// The error of a machine where cudarc would not find NCCL, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NcclNotFound(pub String);

/// Ok when one of the names cudarc tries opens (so its NCCL calls will not panic); otherwise an
/// error naming the names tried, whether `libnccl.so.2` is present and the command that fixes it.
pub fn check_nccl_loadable() -> Result<(), NcclNotFound> {
    let candidates = nccl_library_candidates();
    if candidates.iter().any(|c| dlopen(c).is_some()) {
        return Ok(());
    }
    Err(not_found_message(
        &candidates,
        find_libnccl_so2().as_deref(),
    ))
}

/// The text of [`NcclNotFound`] (separate so a test can check both cases).
pub fn not_found_message(candidates: &[String], so2: Option<&Path>) -> NcclNotFound {
    let tried = candidates.join(", ");
    let head = format!(
        "NCCL not found: cudarc loads libnccl.so (it tried {tried}), and NCCL ships \
         {NCCL_SONAME}"
    );
    let fix = match so2 {
        Some(p) => format!(
            "{NCCL_SONAME} is at {}: run `mkdir -p DIR && ln -sf {} DIR/libnccl.so` and put DIR \
             on LD_LIBRARY_PATH, or start the ranks with `topcoat launch`, which does this",
            p.display(),
            p.display()
        ),
        None => format!(
            "{NCCL_SONAME} is not on the library path either: install NCCL (the \
             `nvidia-nccl-cu13` wheel or the libnccl2 package), then run `ln -s $(ldconfig -p | \
             grep {NCCL_SONAME} | head -n1 | awk '{{print $NF}}') DIR/libnccl.so` and put DIR on \
             LD_LIBRARY_PATH, or start the ranks with `topcoat launch`, which does this; a run \
             at world size 1 needs no NCCL"
        ),
    };
    NcclNotFound(format!("{head}; {fix}"))
}

/// Makes `dir/libnccl.so` a symlink to `target` (replacing a stale link), creating `dir`.
pub fn link_libnccl(dir: &Path, target: &Path) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let link = dir.join("libnccl.so");
    match std::fs::read_link(&link) {
        Ok(old) if old == target => return Ok(link),
        Ok(_) => std::fs::remove_file(&link)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // A regular file of that name: leave it alone and say so.
        Err(_) if link.exists() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a symlink", link.display()),
            ))
        }
        Err(e) => return Err(e),
    }
    std::os::unix::fs::symlink(target, &link)?;
    Ok(link)
}

/// For a launcher: `Ok(None)` when cudarc already finds NCCL; `Ok(Some(dir))` after making
/// `dir/libnccl.so -> libnccl.so.2` (put `dir` first on the ranks' LD_LIBRARY_PATH); an error
/// saying what to do when no `libnccl.so.2` loads either.
pub fn ensure_libnccl_symlink(dir: &Path) -> Result<Option<PathBuf>, NcclNotFound> {
    let Err(missing) = check_nccl_loadable() else {
        return Ok(None);
    };
    let Some(so2) = find_libnccl_so2() else {
        return Err(missing);
    };
    link_libnccl(dir, &so2).map_err(|e| {
        NcclNotFound(format!(
            "{missing}; linking {}/libnccl.so -> {} failed: {e}",
            dir.display(),
            so2.display()
        ))
    })?;
    Ok(Some(dir.to_path_buf()))
}

/// Where a launcher may put that link when the user names no folder.
pub fn nccl_library_dir_hint() -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("topcoat-nccl-{uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_cudarcs_and_exclude_so2() {
        let c = nccl_library_candidates();
        assert_eq!(c[0], "libnccl.so");
        assert!(c.contains(&"libnccl.so.13".to_string()), "{c:?}");
        assert!(!c.contains(&NCCL_SONAME.to_string()), "{c:?}");
    }

    /// This machine has no NCCL: the error names what was tried and what to do. (On a machine
    /// with a `libnccl.so`, the check passes instead.)
    #[test]
    fn missing_nccl_error_says_what_to_do() {
        match check_nccl_loadable() {
            Ok(()) => assert!(nccl_library_candidates()
                .iter()
                .any(|c| dlopen(c).is_some())),
            Err(NcclNotFound(msg)) => {
                assert!(
                    msg.starts_with("NCCL not found: cudarc loads libnccl.so"),
                    "{msg}"
                );
                for want in [
                    "libnccl.so.13",
                    "libnccl.so.2",
                    "LD_LIBRARY_PATH",
                    "topcoat launch",
                ] {
                    assert!(msg.contains(want), "missing {want:?}: {msg}");
                }
                assert_eq!(
                    msg.contains("is not on the library path"),
                    find_libnccl_so2().is_none()
                );
            }
        }
    }

    #[test]
    fn message_with_so2_present_names_its_path() {
        let cands = vec!["libnccl.so".to_string(), "libnccl.so.13".to_string()];
        let p = Path::new("/opt/nccl/lib/libnccl.so.2");
        let NcclNotFound(msg) = not_found_message(&cands, Some(p));
        assert!(msg.contains("it tried libnccl.so, libnccl.so.13"), "{msg}");
        assert!(
            msg.contains("ln -sf /opt/nccl/lib/libnccl.so.2 DIR/libnccl.so"),
            "{msg}"
        );
    }

    #[test]
    fn ensure_without_nccl_is_the_named_error() {
        if find_libnccl_so2().is_some() || check_nccl_loadable().is_ok() {
            return; // a machine with NCCL: nothing to prove here
        }
        let dir = tempfile::tempdir().unwrap();
        let err = ensure_libnccl_symlink(dir.path()).unwrap_err();
        assert!(err.0.contains("NCCL not found"), "{err}");
        assert!(!dir.path().join("libnccl.so").exists());
    }

    #[test]
    fn link_is_made_replaced_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("lib");
        let (a, b) = (dir.path().join("a.so.2"), dir.path().join("b.so.2"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let link = link_libnccl(&sub, &a).unwrap();
        assert_eq!(link, sub.join("libnccl.so"));
        assert_eq!(std::fs::read(&link).unwrap(), b"a");
        link_libnccl(&sub, &a).unwrap(); // same target: kept
        link_libnccl(&sub, &b).unwrap(); // stale: replaced
        assert_eq!(std::fs::read_link(&link).unwrap(), b);
        // A regular file of that name is never clobbered.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("libnccl.so"), b"real").unwrap();
        let e = link_libnccl(&other, &a).unwrap_err();
        assert!(e.to_string().contains("is not a symlink"), "{e}");
        assert_eq!(std::fs::read(other.join("libnccl.so")).unwrap(), b"real");
    }
}
