//! A writer for the `newc` cpio format the kernel unpacks as initramfs.

use std::io::Write;

pub struct Cpio {
    out: Vec<u8>,
    inode: u32,
}

impl Default for Cpio {
    fn default() -> Self {
        Cpio::new()
    }
}

impl Cpio {
    pub fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            inode: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let name = name.trim_start_matches('/');
        let fields = [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.inode += 1;
        let _ = write!(self.out, "070701");
        for field in fields {
            let _ = write!(self.out, "{field:08x}");
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, b"");
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes());
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, b"");
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_aligned_and_terminated() {
        let mut cpio = Cpio::new();
        cpio.dir("bin");
        cpio.file("/bin/x", 0o755, b"abc");
        cpio.symlink("sh", "bin/x");
        let bytes = cpio.finish();
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // The file's size field (7th) is 3.
        let second = text.match_indices("070701").nth(1).unwrap().0;
        assert_eq!(&text[second + 6 + 6 * 8..second + 6 + 7 * 8], "00000003");
    }
}
