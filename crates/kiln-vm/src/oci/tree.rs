//! A directory tree written only through descriptors. Every path is
//! walked one component at a time from the tree's root with `O_NOFOLLOW`:
//! a symlink met on the way is followed as the guest would follow it (an
//! absolute target starts again at the tree's root) and refused when it
//! would climb above the root, and the last component is never followed.
//! No path of the host is ever built from an archive's names.

use std::collections::VecDeque;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// Longest path an archive may name, and longest symlink target.
pub const PATH_MAX: usize = 4096;
/// Longest name of one component.
pub const NAME_MAX: usize = 255;
/// Symlinks followed while resolving one path (the kernel's own limit).
const HOPS_MAX: usize = 40;
/// Directory levels a path may have.
const DEPTH_MAX: usize = PATH_MAX / 2;
/// Directory levels a removal descends, each holding a descriptor and a
/// stack frame; no real image nests deeper.
pub const REMOVE_DEPTH_MAX: usize = 256;

/// Why a path could not be resolved or written.
#[derive(Debug)]
pub enum TreeError {
    /// The archive tries to reach outside the tree, or names a path no
    /// file system can hold.
    Hostile(String),
    Io(std::io::Error),
}

impl std::fmt::Display for TreeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TreeError::Hostile(message) => f.write_str(message),
            TreeError::Io(error) => write!(f, "{error}"),
        }
    }
}

impl From<Errno> for TreeError {
    fn from(errno: Errno) -> TreeError {
        TreeError::Io(errno.into())
    }
}

impl From<std::io::Error> for TreeError {
    fn from(error: std::io::Error) -> TreeError {
        TreeError::Io(error)
    }
}

fn hostile(message: impl Into<String>) -> TreeError {
    TreeError::Hostile(message.into())
}

/// The components of an archive's path: relative, without `..`, with `.`
/// and empty components dropped; each is a name `*at` calls can take.
pub fn components(path: &[u8]) -> Result<Vec<&[u8]>, TreeError> {
    let shown = || String::from_utf8_lossy(&path[..path.len().min(200)]).into_owned();
    if path.len() > PATH_MAX {
        return Err(hostile(format!("{}…: path too long", shown())));
    }
    if path.first() == Some(&b'/') {
        return Err(hostile(format!("{}: absolute path", shown())));
    }
    let mut out = Vec::new();
    for part in path.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(hostile(format!("{}: '..' in path", shown()))),
            name if name.len() > NAME_MAX || name.contains(&0) => {
                return Err(hostile(format!("{}: bad name", shown())))
            }
            name => out.push(name),
        }
    }
    Ok(out)
}

fn cname(name: &[u8]) -> Result<CString, TreeError> {
    CString::new(name).map_err(|_| hostile("NUL in a name"))
}

fn kind(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

pub fn is_dir(stat: &FileStat) -> bool {
    kind(stat) == SFlag::S_IFDIR
}

/// `name` in `dir`, not followed; `None` when there is nothing.
pub fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<Option<FileStat>, TreeError> {
    match nix::sys::stat::fstatat(dir, cname(name)?.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(stat)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Opens the directory `name` in `dir`, never through a symlink.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<OwnedFd, TreeError> {
    Ok(nix::fcntl::openat(
        dir,
        cname(name)?.as_c_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

pub struct Tree {
    root: OwnedFd,
}

impl Tree {
    /// The tree rooted at `path`, an existing directory (not a symlink).
    pub fn open(path: &Path) -> Result<Tree, TreeError> {
        let root = nix::fcntl::openat(
            nix::fcntl::AT_FDCWD,
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Tree { root })
    }

    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The directory `path` names, its symlinks followed inside the tree;
    /// missing directories are made (mode 0755, root's) when `create`, else
    /// `None`. A component that is neither directory nor symlink refuses.
    pub fn dir(&self, path: &[&[u8]], create: bool) -> Result<Option<OwnedFd>, TreeError> {
        let mut pending: VecDeque<Vec<u8>> = path.iter().map(|c| c.to_vec()).collect();
        // The real directories walked so far, from the root down.
        let mut walked: Vec<Vec<u8>> = Vec::new();
        let mut current = self.root.try_clone()?;
        let mut hops = 0;
        while let Some(name) = pending.pop_front() {
            match name.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    if walked.pop().is_none() {
                        return Err(hostile("a symlink leads above the root"));
                    }
                    // Back down from the root: every step is a real directory.
                    current = self.root.try_clone()?;
                    for step in &walked {
                        current = open_dir_at(current.as_fd(), step)?;
                    }
                    continue;
                }
                _ => {}
            }
            let stat = stat_at(current.as_fd(), &name)?;
            match stat {
                Some(stat) if is_dir(&stat) => {
                    current = open_dir_at(current.as_fd(), &name)?;
                    walked.push(name);
                }
                Some(stat) if kind(&stat) == SFlag::S_IFLNK => {
                    hops += 1;
                    if hops > HOPS_MAX {
                        return Err(hostile("too many levels of symlinks"));
                    }
                    let target = nix::fcntl::readlinkat(current.as_fd(), cname(&name)?.as_c_str())?;
                    let target = target.as_bytes();
                    if target.len() > PATH_MAX {
                        return Err(hostile("symlink target too long"));
                    }
                    if target.first() == Some(&b'/') {
                        walked.clear();
                        current = self.root.try_clone()?;
                    }
                    for part in target.split(|b| *b == b'/').rev() {
                        pending.push_front(part.to_vec());
                    }
                    if pending.len() > PATH_MAX {
                        return Err(hostile("symlinks lead too deep"));
                    }
                }
                Some(_) => {
                    return Err(hostile(format!(
                        "{}: not a directory",
                        String::from_utf8_lossy(&name)
                    )))
                }
                None if create => {
                    if name.len() > NAME_MAX {
                        return Err(hostile("bad name"));
                    }
                    match nix::sys::stat::mkdirat(
                        current.as_fd(),
                        cname(&name)?.as_c_str(),
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    current = open_dir_at(current.as_fd(), &name)?;
                    walked.push(name);
                }
                None => return Ok(None),
            }
            if walked.len() > DEPTH_MAX {
                return Err(hostile("path too deep"));
            }
        }
        Ok(Some(current))
    }

    /// The directory holding the last component of `path` (made when
    /// missing), and that component.
    pub fn parent<'p>(&self, path: &[&'p [u8]]) -> Result<(OwnedFd, &'p [u8]), TreeError> {
        let (last, parents) = path
            .split_last()
            .ok_or_else(|| hostile("the tree's root itself"))?;
        let dir = self
            .dir(parents, true)?
            .ok_or_else(|| hostile("no parent directory"))?;
        Ok((dir, last))
    }

    /// Makes `path` a directory (and its parents) if it is none, replacing
    /// a file or symlink in its place.
    pub fn make_dir(&self, path: &[&[u8]], mode: u32) -> Result<OwnedFd, TreeError> {
        let (dir, name) = self.parent(path)?;
        match stat_at(dir.as_fd(), name)? {
            Some(stat) if is_dir(&stat) => {}
            other => {
                if other.is_some() {
                    remove_at(dir.as_fd(), name)?;
                }
                nix::sys::stat::mkdirat(
                    dir.as_fd(),
                    cname(name)?.as_c_str(),
                    Mode::from_bits_truncate(mode),
                )?;
            }
        }
        open_dir_at(dir.as_fd(), name)
    }
}

/// Removes `name` in `dir` and, for a directory, everything below it;
/// nothing is followed.
pub fn remove_at(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(), TreeError> {
    remove_below(dir, name, 0)
}

fn remove_below(dir: BorrowedFd<'_>, name: &[u8], depth: usize) -> Result<(), TreeError> {
    let Some(stat) = stat_at(dir, name)? else {
        return Ok(());
    };
    let c = cname(name)?;
    if is_dir(&stat) {
        if depth > REMOVE_DEPTH_MAX {
            return Err(hostile("directories too deep to remove"));
        }
        let inner = open_dir_at(dir, name)?;
        prune(inner.as_fd(), depth + 1, &mut |_| false)?;
        nix::unistd::unlinkat(dir, c.as_c_str(), nix::unistd::UnlinkatFlags::RemoveDir)?;
    } else {
        nix::unistd::unlinkat(dir, c.as_c_str(), nix::unistd::UnlinkatFlags::NoRemoveDir)?;
    }
    Ok(())
}

/// Removes every entry of `dir` whose name `keep` refuses (directories
/// with all below them). Passes over the directory until one removes
/// nothing, so no list of names is held and none is missed.
pub fn prune(
    dir: BorrowedFd<'_>,
    depth: usize,
    keep: &mut dyn FnMut(&[u8]) -> bool,
) -> Result<(), TreeError> {
    let mut handle = nix::dir::Dir::from_fd(dir.try_clone_to_owned()?)?;
    loop {
        let mut removed = 0usize;
        // The iterator rewinds when dropped: each pass reads from the start.
        for entry in handle.iter() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            if !keep(name) {
                remove_below(dir, name, depth)?;
                removed += 1;
            }
        }
        if removed == 0 {
            break;
        }
    }
    Ok(())
}

/// Hands `each` the directories in `dir` whose names `keep` keeps, opened,
/// for a caller that prunes below them too.
pub fn subdirs_kept(
    dir: BorrowedFd<'_>,
    keep: &mut dyn FnMut(&[u8]) -> bool,
    mut each: impl FnMut(&[u8], OwnedFd) -> Result<(), TreeError>,
) -> Result<(), TreeError> {
    let mut handle = nix::dir::Dir::from_fd(dir.try_clone_to_owned()?)?;
    for entry in handle.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." || !keep(name) {
            continue;
        }
        if stat_at(dir, name)?.is_some_and(|s| is_dir(&s)) {
            each(name, open_dir_at(dir, name)?)?;
        }
    }
    Ok(())
}

/// For messages: a path as the archive named it.
pub fn shown(path: &[&[u8]]) -> String {
    let joined = path.join(&b'/');
    OsStr::from_bytes(&joined).to_string_lossy().into_owned()
}
