//! One layer's tar applied over the tree the layers below it made, as the
//! OCI image spec lays down: `.wh.<name>` deletes `<name>`, `.wh..wh..opq`
//! hides everything the lower layers put in its directory. The archive is
//! hostile until proven otherwise: absolute paths and `..` refuse it, so
//! does a path that leads through a symlink out of the tree; device nodes
//! are skipped; files keep their owners and mode bits (setuid too: it is
//! the guest's file system) and the extended attributes of their PAX
//! `SCHILY.xattr.` records in the `user.`, `trusted.` and `security.`
//! namespaces (file capabilities are `security.capability`); the bytes
//! read and the entries are counted against the image's limits; no name
//! is held beyond a fixed bound.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use tar::EntryType;

use super::tree::{self, components, is_dir, shown, stat_at, Tree, TreeError, PATH_MAX};

/// Bytes of one entry's PAX header kiln reads; real ones are a few
/// hundred.
const PAX_MAX: u64 = 1 << 20;
/// Paths this layer wrote, remembered for opaque directories: past this
/// many the layer is refused rather than memory grown.
const SEEN_MAX: usize = 1 << 22;
/// Bytes of directory paths whose times are set when the layer ends; past
/// this a directory keeps the time its last write gave it.
const DIR_TIMES_MAX: usize = 16 << 20;
/// Extended attributes one entry may carry, and the bytes of one value
/// (the kernel's own cap, `XATTR_SIZE_MAX`).
pub const XATTRS_MAX: usize = 64;
pub const XATTR_VALUE_MAX: usize = 64 << 10;
/// Longest attribute name, namespace included (`XATTR_NAME_MAX`).
const XATTR_NAME_MAX: usize = 255;
/// The PAX records that carry extended attributes (GNU tar's and
/// Docker's spelling).
const XATTR_RECORD: &[u8] = b"SCHILY.xattr.";
/// The namespaces applied; `system.` (ACLs, and whatever a file system
/// makes of it) and any other are left out.
const XATTR_NAMESPACES: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];

/// What is left of the image's allowance as its layers are applied.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Bytes of uncompressed layer archives still allowed.
    pub bytes: u64,
    /// Archive entries still allowed.
    pub entries: u64,
}

#[derive(Debug)]
pub enum LayerError {
    /// The archive breaks a rule; the image is refused.
    Refused(String),
    /// Over a limit of the image.
    TooLarge(String),
    Io(std::io::Error),
}

impl std::fmt::Display for LayerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerError::Refused(m) | LayerError::TooLarge(m) => f.write_str(m),
            LayerError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// A reader that counts and hashes what passes and stops at a limit, so
/// neither a decompression bomb nor an endless stream gets further.
pub struct Metered<R> {
    inner: R,
    hash: sha2::Sha256,
    pub read: u64,
    limit: u64,
    pub over: bool,
}

impl<R: Read> Metered<R> {
    pub fn new(inner: R, limit: u64) -> Metered<R> {
        use sha2::Digest;
        Metered {
            inner,
            hash: sha2::Sha256::new(),
            read: 0,
            limit,
            over: false,
        }
    }

    /// Reads what is left (a tar's trailing blocks count towards its
    /// digest too) and returns `sha256:<hex>` of everything read.
    pub fn finish(&mut self) -> std::io::Result<(String, u64)> {
        use sha2::Digest;
        std::io::copy(self, &mut std::io::sink())?;
        let hash = std::mem::replace(&mut self.hash, sha2::Sha256::new());
        Ok((
            format!("sha256:{}", hex::encode(hash.finalize())),
            self.read,
        ))
    }
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            self.over = true;
            return Err(std::io::Error::other("over the unpacked size limit"));
        }
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

fn refused(path: &[&[u8]], why: impl std::fmt::Display) -> LayerError {
    LayerError::Refused(format!("{}: {why}", shown(path)))
}

impl From<std::io::Error> for LayerError {
    fn from(error: std::io::Error) -> LayerError {
        LayerError::Io(error)
    }
}

fn tree_error(path: &[&[u8]], error: TreeError) -> LayerError {
    match error {
        TreeError::Hostile(m) => refused(path, m),
        TreeError::Io(e) => LayerError::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", shown(path)),
        )),
    }
}

/// Reads an extension entry's data, refusing more than `max` bytes.
fn read_bounded(entry: &mut impl Read, size: u64, max: u64) -> Result<Vec<u8>, LayerError> {
    if size > max {
        return Err(LayerError::Refused(format!(
            "an extension header of {size} bytes"
        )));
    }
    let mut data = Vec::with_capacity(size as usize);
    entry.take(max).read_to_end(&mut data)?;
    Ok(data)
}

/// A GNU long name: its bytes up to the first NUL.
fn long_name(mut data: Vec<u8>) -> Vec<u8> {
    if let Some(end) = data.iter().position(|b| *b == 0) {
        data.truncate(end);
    }
    data
}

/// Owner and time as the entry's header, or its PAX records, give them,
/// and the extended attributes of its PAX records.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
    xattrs: Vec<(std::ffi::CString, Vec<u8>)>,
}

/// Adds the attribute of a `SCHILY.xattr.<name>` record to `xattrs` when
/// its namespace is one kiln applies (a later record of the same name
/// wins); `Err` with the reason when it breaks a bound.
fn add_xattr(
    xattrs: &mut Vec<(std::ffi::CString, Vec<u8>)>,
    name: &[u8],
    value: &[u8],
) -> Result<(), String> {
    let applied = XATTR_NAMESPACES
        .iter()
        .any(|ns| name.len() > ns.len() && name.starts_with(ns));
    if !applied {
        return Ok(());
    }
    let shown = || String::from_utf8_lossy(&name[..name.len().min(80)]).into_owned();
    if name.len() > XATTR_NAME_MAX {
        return Err(format!("extended attribute {}…: name too long", shown()));
    }
    let Ok(cname) = std::ffi::CString::new(name) else {
        return Err(format!("extended attribute {}: NUL in its name", shown()));
    };
    if value.len() > XATTR_VALUE_MAX {
        return Err(format!(
            "extended attribute {}: a value of {} bytes (at most {XATTR_VALUE_MAX})",
            shown(),
            value.len()
        ));
    }
    if let Some(slot) = xattrs.iter_mut().find(|(n, _)| *n == cname) {
        slot.1 = value.to_vec();
        return Ok(());
    }
    if xattrs.len() >= XATTRS_MAX {
        return Err(format!(
            "more than {XATTRS_MAX} extended attributes on one entry"
        ));
    }
    xattrs.push((cname, value.to_vec()));
    Ok(())
}

/// Applies the tar read from `archive` over `tree`. `own` sets each
/// file's owner (only root may; tests that are not root leave it).
pub fn apply(
    tree: &Tree,
    archive: impl Read,
    budget: &mut Budget,
    own: bool,
) -> Result<(), LayerError> {
    let mut archive = tar::Archive::new(archive);
    let mut layer = Layer {
        tree,
        own,
        seen: HashSet::new(),
        hasher: std::collections::hash_map::RandomState::new(),
        dir_times: Vec::new(),
        dir_times_bytes: 0,
    };
    {
        // Raw: extension headers come to this loop, which bounds them.
        let entries = archive.entries()?.raw(true);
        // What extension headers say of the entry after them.
        let mut long_path: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<u8>> = None;
        for entry in entries {
            let mut entry = entry?;
            if budget.entries == 0 {
                return Err(LayerError::TooLarge(
                    "the image has more entries than allowed".into(),
                ));
            }
            budget.entries -= 1;
            let header = entry.header().clone();
            let size = entry.size();
            match header.entry_type() {
                EntryType::GNULongName => {
                    long_path = Some(long_name(read_bounded(
                        &mut entry,
                        size,
                        PATH_MAX as u64 + 1,
                    )?));
                    continue;
                }
                EntryType::GNULongLink => {
                    long_link = Some(long_name(read_bounded(
                        &mut entry,
                        size,
                        PATH_MAX as u64 + 1,
                    )?));
                    continue;
                }
                EntryType::XHeader => {
                    pax = Some(read_bounded(&mut entry, size, PAX_MAX)?);
                    continue;
                }
                EntryType::XGlobalHeader => continue,
                _ => {}
            }
            let (mut path, mut link) = (
                long_path
                    .take()
                    .unwrap_or_else(|| header.path_bytes().into_owned()),
                long_link
                    .take()
                    .or_else(|| header.link_name_bytes().map(|l| l.into_owned())),
            );
            let mut meta = Meta {
                uid: 0,
                gid: 0,
                mode: header.mode().unwrap_or(0o644) & 0o7777,
                mtime: header
                    .mtime()
                    .map(|t| i64::try_from(t).unwrap_or(i64::MAX))
                    .unwrap_or(0),
                xattrs: Vec::new(),
            };
            let mut xattr_fault: Option<String> = None;
            let (mut uid, mut gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
            if let Some(records) = pax.take() {
                for record in tar::PaxExtensions::new(&records) {
                    let Ok(record) = record else {
                        return Err(LayerError::Refused("a malformed PAX header".into()));
                    };
                    let value = record.value_bytes();
                    let number = || {
                        std::str::from_utf8(value)
                            .ok()
                            .and_then(|v| v.split('.').next()?.parse::<u64>().ok())
                    };
                    match record.key_bytes() {
                        b"path" => path = value.to_vec(),
                        b"linkpath" => link = Some(value.to_vec()),
                        b"uid" => uid = number().unwrap_or(uid),
                        b"gid" => gid = number().unwrap_or(gid),
                        b"mtime" => {
                            meta.mtime = number()
                                .map(|t| i64::try_from(t).unwrap_or(i64::MAX))
                                .unwrap_or(meta.mtime)
                        }
                        key => {
                            if let Some(name) = key.strip_prefix(XATTR_RECORD) {
                                if let Err(why) = add_xattr(&mut meta.xattrs, name, value) {
                                    xattr_fault.get_or_insert(why);
                                }
                            }
                        }
                    }
                }
            }
            let parts = components(&path).map_err(|e| {
                LayerError::Refused(format!("{}: {e}", String::from_utf8_lossy(&path)))
            })?;
            if let Some(why) = xattr_fault {
                return Err(refused(&parts, why));
            }
            // u32::MAX is chown's "leave as is".
            match (u32::try_from(uid), u32::try_from(gid)) {
                (Ok(u), Ok(g)) if u != u32::MAX && g != u32::MAX => (meta.uid, meta.gid) = (u, g),
                _ => return Err(refused(&parts, format!("owner {uid}:{gid} out of range"))),
            }
            layer.entry(
                &parts,
                header.entry_type(),
                link.as_deref(),
                &meta,
                &mut entry,
            )?;
        }
    }
    layer.set_dir_times();
    Ok(())
}

struct Layer<'t> {
    tree: &'t Tree,
    own: bool,
    /// Hashes of the paths this layer wrote and of their parents: an
    /// opaque directory keeps them.
    seen: HashSet<u64>,
    hasher: std::collections::hash_map::RandomState,
    /// Directories' times, set when the layer ends (writing into a
    /// directory would change its time again).
    dir_times: Vec<(Vec<u8>, i64)>,
    dir_times_bytes: usize,
}

impl Layer<'_> {
    fn key(&self, path: &[&[u8]]) -> u64 {
        self.hasher.hash_one(path)
    }

    /// Remembers `path` and its parents as this layer's.
    fn saw(&mut self, path: &[&[u8]]) -> Result<(), LayerError> {
        for end in (1..=path.len()).rev() {
            if !self.seen.insert(self.key(&path[..end])) {
                break;
            }
            if self.seen.len() > SEEN_MAX {
                return Err(LayerError::TooLarge(
                    "a layer with more paths than allowed".into(),
                ));
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        path: &[&[u8]],
        kind: EntryType,
        link: Option<&[u8]>,
        meta: &Meta,
        data: &mut impl Read,
    ) -> Result<(), LayerError> {
        let Some(name) = path.last() else {
            // The root itself (`./`): the tree's root stays as kiln made it.
            return Ok(());
        };
        if let Some(hidden) = name.strip_prefix(b".wh.") {
            return self.whiteout(path, hidden);
        }
        match kind {
            EntryType::Regular | EntryType::Continuous => self.file(path, meta, data)?,
            EntryType::Directory => self.dir(path, meta)?,
            EntryType::Symlink => {
                let target = link.filter(|l| !l.is_empty() && l.len() < PATH_MAX);
                let target =
                    target.ok_or_else(|| refused(path, "symlink target missing or too long"))?;
                self.symlink(path, target, meta)?;
            }
            EntryType::Link => {
                let target = link.ok_or_else(|| refused(path, "hardlink without a target"))?;
                self.hardlink(path, target)?;
            }
            EntryType::Fifo => self.fifo(path, meta)?,
            // A device node in an image is no business of a sandbox.
            EntryType::Char | EntryType::Block => return Ok(()),
            EntryType::GNUSparse => return Err(refused(path, "sparse files are not supported")),
            other => {
                return Err(refused(
                    path,
                    format!("entry type {} is not supported", other.as_byte()),
                ))
            }
        }
        self.saw(path)
    }

    fn whiteout(&mut self, path: &[&[u8]], hidden: &[u8]) -> Result<(), LayerError> {
        let parent = &path[..path.len() - 1];
        if hidden == b".wh..opq" {
            let dir = self
                .tree
                .dir(parent, true)
                .map_err(|e| tree_error(path, e))?
                .ok_or_else(|| refused(path, "no directory"))?;
            let mut prefix: Vec<Vec<u8>> = parent.iter().map(|p| p.to_vec()).collect();
            self.opaque(dir.as_fd(), &mut prefix, 0)
                .map_err(|e| tree_error(path, e))?;
            return self.saw(parent);
        }
        // Other `.wh..wh.` names are aufs's own bookkeeping.
        if hidden.starts_with(b".wh.") {
            return Ok(());
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(refused(path, "whiteout of nothing"));
        }
        let Some(dir) = self
            .tree
            .dir(parent, false)
            .map_err(|e| tree_error(path, e))?
        else {
            return Ok(());
        };
        let mut target: Vec<&[u8]> = parent.to_vec();
        target.push(hidden);
        if self.seen.contains(&self.key(&target)) {
            // Whiteouts hide the lower layers, not this one.
            return Ok(());
        }
        tree::remove_at(dir.as_fd(), hidden).map_err(|e| tree_error(path, e))
    }

    /// Removes what the lower layers put under `dir` (the tree's `prefix`),
    /// keeping what this layer wrote.
    fn opaque(
        &self,
        dir: BorrowedFd<'_>,
        prefix: &mut Vec<Vec<u8>>,
        depth: usize,
    ) -> Result<(), TreeError> {
        if depth > tree::REMOVE_DEPTH_MAX {
            return Err(TreeError::Hostile("directories too deep".into()));
        }
        let keep = |prefix: &Vec<Vec<u8>>, name: &[u8]| {
            let mut path: Vec<&[u8]> = prefix.iter().map(Vec::as_slice).collect();
            path.push(name);
            self.seen.contains(&self.key(&path))
        };
        tree::prune(dir, depth, &mut |name| keep(prefix, name))?;
        let mut kept: Vec<(Vec<u8>, OwnedFd)> = Vec::new();
        tree::subdirs_kept(dir, &mut |name| keep(prefix, name), |name, fd| {
            kept.push((name.to_vec(), fd));
            Ok(())
        })?;
        for (name, fd) in kept {
            prefix.push(name);
            self.opaque(fd.as_fd(), prefix, depth + 1)?;
            prefix.pop();
        }
        Ok(())
    }

    /// The parent directory of `path`, with whatever is at its last
    /// component removed (a directory with all below it).
    fn clear(&self, path: &[&[u8]]) -> Result<OwnedFd, LayerError> {
        let (dir, name) = self.tree.parent(path).map_err(|e| tree_error(path, e))?;
        tree::remove_at(dir.as_fd(), name).map_err(|e| tree_error(path, e))?;
        Ok(dir)
    }

    fn file(
        &mut self,
        path: &[&[u8]],
        meta: &Meta,
        data: &mut impl Read,
    ) -> Result<(), LayerError> {
        let dir = self.clear(path)?;
        let name = cname(path)?;
        let fd = nix::fcntl::openat(
            dir.as_fd(),
            name.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| io_at(path, e))?;
        let mut file = std::fs::File::from(fd);
        std::io::copy(data, &mut file)?;
        self.finish_fd(path, file.as_fd(), meta)
    }

    /// Owner, then mode (a change of owner clears setuid), then extended
    /// attributes (a change of owner or a write would clear
    /// `security.capability`), then time. `fd` is the file or directory
    /// itself, opened without following anything: an attribute never
    /// lands on what a symlink names.
    fn finish_fd(&self, path: &[&[u8]], fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), LayerError> {
        if self.own {
            nix::unistd::fchown(
                fd,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            )
            .map_err(|e| io_at(path, e))?;
        }
        nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(meta.mode))
            .map_err(|e| io_at(path, e))?;
        for (name, value) in &meta.xattrs {
            self.set_xattr(path, fd, name, value)?;
        }
        let time = TimeSpec::new(meta.mtime, 0);
        nix::sys::stat::futimens(fd, &time, &time).map_err(|e| io_at(path, e))?;
        Ok(())
    }

    /// One extended attribute on `fd`. What this host's file system cannot
    /// hold (no such namespace here), or this process may not set
    /// (`trusted.` needs root), is left out; a value the kernel calls
    /// invalid (a malformed `security.capability`) refuses the layer.
    fn set_xattr(
        &self,
        path: &[&[u8]],
        fd: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        value: &[u8],
    ) -> Result<(), LayerError> {
        use std::os::fd::AsRawFd;
        // SAFETY: the name is NUL-terminated, the value a live slice of
        // its length, the descriptor open for the call's duration.
        let done = unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if done == 0 {
            return Ok(());
        }
        match Errno::last() {
            Errno::EOPNOTSUPP => Ok(()),
            Errno::EPERM if !self.own => Ok(()),
            Errno::EINVAL | Errno::ERANGE => Err(refused(
                path,
                format!(
                    "extended attribute {}: refused by the kernel as invalid",
                    name.to_string_lossy()
                ),
            )),
            e => Err(LayerError::Io(std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!(
                    "{}: extended attribute {}: {e}",
                    shown(path),
                    name.to_string_lossy()
                ),
            ))),
        }
    }

    fn dir(&mut self, path: &[&[u8]], meta: &Meta) -> Result<(), LayerError> {
        let fd = self
            .tree
            .make_dir(path, 0o700)
            .map_err(|e| tree_error(path, e))?;
        self.finish_fd(path, fd.as_fd(), meta)?;
        let joined = path.join(&b'/');
        if self.dir_times_bytes + joined.len() <= DIR_TIMES_MAX {
            self.dir_times_bytes += joined.len();
            self.dir_times.push((joined, meta.mtime));
        }
        Ok(())
    }

    fn symlink(&mut self, path: &[&[u8]], target: &[u8], meta: &Meta) -> Result<(), LayerError> {
        let dir = self.clear(path)?;
        let name = cname(path)?;
        let target = std::ffi::CString::new(target).map_err(|_| refused(path, "NUL in target"))?;
        nix::unistd::symlinkat(target.as_c_str(), dir.as_fd(), name.as_c_str())
            .map_err(|e| io_at(path, e))?;
        self.finish_at(path, dir.as_fd(), meta)
    }

    fn fifo(&mut self, path: &[&[u8]], meta: &Meta) -> Result<(), LayerError> {
        let dir = self.clear(path)?;
        let name = cname(path)?;
        nix::unistd::mkfifoat(
            dir.as_fd(),
            name.as_c_str(),
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| io_at(path, e))?;
        if self.own {
            nix::unistd::fchownat(
                dir.as_fd(),
                name.as_c_str(),
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_at(path, e))?;
        }
        nix::sys::stat::fchmodat(
            dir.as_fd(),
            name.as_c_str(),
            Mode::from_bits_truncate(meta.mode),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| io_at(path, e))?;
        Ok(())
    }

    /// Owner and time of a symlink, which has no mode of its own.
    fn finish_at(
        &self,
        path: &[&[u8]],
        dir: BorrowedFd<'_>,
        meta: &Meta,
    ) -> Result<(), LayerError> {
        let name = cname(path)?;
        if self.own {
            nix::unistd::fchownat(
                dir,
                name.as_c_str(),
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_at(path, e))?;
        }
        let time = TimeSpec::new(meta.mtime, 0);
        nix::sys::stat::utimensat(
            dir,
            name.as_c_str(),
            &time,
            &time,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io_at(path, e))?;
        Ok(())
    }

    /// A second name for a file already in the tree (this layer's or a
    /// lower one's); linked, never followed, so a link to a symlink is a
    /// link to the symlink.
    fn hardlink(&mut self, path: &[&[u8]], target: &[u8]) -> Result<(), LayerError> {
        let target =
            components(target).map_err(|e| refused(path, format!("hardlink target: {e}")))?;
        if target == path {
            return Ok(());
        }
        let (target_dir, target_name) = match target.split_last() {
            Some((name, parents)) => (
                self.tree
                    .dir(parents, false)
                    .map_err(|e| tree_error(path, e))?,
                *name,
            ),
            None => (None, &b""[..]),
        };
        let target_dir = target_dir.ok_or_else(|| refused(path, "hardlink to nothing"))?;
        match stat_at(target_dir.as_fd(), target_name).map_err(|e| tree_error(path, e))? {
            Some(stat) if !is_dir(&stat) => {}
            Some(_) => return Err(refused(path, "hardlink to a directory")),
            None => return Err(refused(path, "hardlink to nothing")),
        }
        let dir = self.clear(path)?;
        let name = cname(path)?;
        let target_name = std::ffi::CString::new(target_name).map_err(|_| refused(path, "NUL"))?;
        nix::unistd::linkat(
            target_dir.as_fd(),
            target_name.as_c_str(),
            dir.as_fd(),
            name.as_c_str(),
            AtFlags::empty(),
        )
        .map_err(|e| io_at(path, e))?;
        Ok(())
    }

    /// Directories' times once nothing more is written into them; a
    /// directory gone meanwhile is simply skipped.
    fn set_dir_times(&mut self) {
        for (path, mtime) in std::mem::take(&mut self.dir_times) {
            let Ok(parts) = components(&path) else {
                continue;
            };
            let Ok(Some(fd)) = self.tree.dir(&parts, false) else {
                continue;
            };
            let time = TimeSpec::new(mtime, 0);
            let _ = nix::sys::stat::futimens(fd.as_fd(), &time, &time);
        }
    }
}

fn cname(path: &[&[u8]]) -> Result<std::ffi::CString, LayerError> {
    let name = path.last().copied().unwrap_or(b"");
    std::ffi::CString::new(name).map_err(|_| refused(path, "NUL in a name"))
}

fn io_at(path: &[&[u8]], errno: Errno) -> LayerError {
    LayerError::Io(std::io::Error::new(
        std::io::Error::from(errno).kind(),
        format!("{}: {errno}", shown(path)),
    ))
}
