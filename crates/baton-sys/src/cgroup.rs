//! What the cgroup filesystem does not say in its files: whether systemd delegated a cgroup.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Whether systemd delegated the cgroup at `dir` to its service (`Delegate=yes`): systemd 251
/// and later mark such a cgroup with the `trusted.delegate` (or, for a user manager,
/// `user.delegate`) extended attribute.
pub fn delegated(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    [c"trusted.delegate", c"user.delegate"].iter().any(|name| {
        let mut value = [0u8; 8];
        // SAFETY: `path` and `name` are NUL-terminated strings that outlive the call; `value`
        // is a writable buffer of the length passed; getxattr writes at most that many bytes.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        n > 0 && value[0] == b'1'
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordinary_directory_is_not_delegated() {
        assert!(!delegated(Path::new("/tmp")));
        assert!(!delegated(Path::new("/no/such/dir")));
    }
}
