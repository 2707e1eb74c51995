//! Small WASI programs in WAT: the test suites and benchmarks run them, and
//! they show what a guest looks like without a wasm toolchain.

const WASI_IMPORTS: &str = r#"
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_symlink" (func $path_symlink (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; write(fd, ptr, len) through an iovec at 0
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
"#;

fn module(body: &str) -> String {
    format!("(module {WASI_IMPORTS} {body})")
}

/// Prints `hello world` and exits 0.
pub fn hello() -> String {
    module(
        r#"(data (i32.const 64) "hello world\n")
           (func (export "_start") (call $write (i32.const 1) (i32.const 64) (i32.const 12)))"#,
    )
}

/// Copies stdin to stdout.
pub fn echo() -> String {
    module(
        r#"(func (export "_start")
             (loop $more
               (i32.store (i32.const 0) (i32.const 1024))
               (i32.store (i32.const 4) (i32.const 4096))
               (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
               (if (i32.gt_u (i32.load (i32.const 8)) (i32.const 0))
                 (then
                   (call $write (i32.const 1) (i32.const 1024) (i32.load (i32.const 8)))
                   (br $more)))))"#,
    )
}

/// Exits with the given code after printing to stderr.
pub fn exit_with(code: i32) -> String {
    module(&format!(
        r#"(data (i32.const 64) "bye\n")
           (func (export "_start")
             (call $write (i32.const 2) (i32.const 64) (i32.const 4))
             (call $proc_exit (i32.const {code})))"#
    ))
}

/// Prints its argv then its environment, each entry ending in NUL.
pub fn args_and_env() -> String {
    module(
        r#"(func (export "_start")
             (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
             (drop (call $args_get (i32.const 1024) (i32.const 2048)))
             (call $write (i32.const 1) (i32.const 2048) (i32.load (i32.const 20)))
             (drop (call $environ_sizes_get (i32.const 16) (i32.const 20)))
             (drop (call $environ_get (i32.const 1024) (i32.const 8192)))
             (call $write (i32.const 1) (i32.const 8192) (i32.load (i32.const 20))))"#,
    )
}

/// Never returns.
pub fn spin() -> String {
    module(r#"(func (export "_start") (loop $forever (br $forever)))"#)
}

/// Grows memory a page at a time until refused, then traps.
pub fn memory_bomb() -> String {
    module(
        r#"(func (export "_start")
             (loop $grow
               (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1))
                 (then unreachable))
               (br $grow)))"#,
    )
}

/// Writes to stdout forever.
pub fn flood() -> String {
    module(
        r#"(func (export "_start")
             (loop $again
               (call $write (i32.const 1) (i32.const 1024) (i32.const 32768))
               (br $again)))"#,
    )
}

/// Prints `count` lines `tick N` (N the line's number mod 10), sleeping
/// `ms` milliseconds after each: a job whose output can be followed.
pub fn slow_lines(count: u32, ms: u64) -> String {
    let ns = ms * 1_000_000;
    module(&format!(
        r#"(data (i32.const 64) "tick 0\n")
           (func (export "_start") (local $i i32)
             (loop $more
               (i32.store8 (i32.const 69)
                 (i32.add (i32.const 48) (i32.rem_u (local.get $i) (i32.const 10))))
               (call $write (i32.const 1) (i32.const 64) (i32.const 7))
               ;; one clock subscription (monotonic, relative) at 256
               (i64.store (i32.const 256) (i64.const 0))
               (i32.store8 (i32.const 264) (i32.const 0))
               (i32.store (i32.const 272) (i32.const 1))
               (i64.store (i32.const 280) (i64.const {ns}))
               (i64.store (i32.const 288) (i64.const 0))
               (i32.store16 (i32.const 296) (i32.const 0))
               (drop (call $poll_oneoff (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))
               (local.set $i (i32.add (local.get $i) (i32.const 1)))
               (br_if $more (i32.lt_u (local.get $i) (i32.const {count})))))"#
    ))
}

/// Prints `total` bytes of 64-byte lines (`abc…\n`) in 32 KiB writes, as
/// fast as it can, and exits 0.
pub fn print_bytes(total: u64) -> String {
    module(&format!(
        r#"(func (export "_start") (local $i i32) (local $left i64) (local $n i64)
             (loop $fill
               (i32.store8 (i32.add (i32.const 1024) (local.get $i))
                 (select (i32.const 10)
                   (i32.add (i32.const 97) (i32.rem_u (local.get $i) (i32.const 26)))
                   (i32.eq (i32.rem_u (local.get $i) (i32.const 64)) (i32.const 63))))
               (local.set $i (i32.add (local.get $i) (i32.const 1)))
               (br_if $fill (i32.lt_u (local.get $i) (i32.const 32768))))
             (local.set $left (i64.const {total}))
             (block $done
               (loop $more
                 (br_if $done (i64.eqz (local.get $left)))
                 (local.set $n (select (local.get $left) (i64.const 32768)
                   (i64.lt_u (local.get $left) (i64.const 32768))))
                 (call $write (i32.const 1) (i32.const 1024) (i32.wrap_i64 (local.get $n)))
                 (local.set $left (i64.sub (local.get $left) (local.get $n)))
                 (br $more))))"#
    ))
}

/// Tries to create `kiln-probe` in the first preopened directory (fd 3) and
/// exits with the WASI errno (0 when it could).
pub fn open_file() -> String {
    module(
        r#"(data (i32.const 64) "kiln-probe")
           (func (export "_start")
             (call $proc_exit
               (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 10)
                 (i32.const 1) (i64.const 0x7ffffff) (i64.const 0x7ffffff) (i32.const 0) (i32.const 128))))"#,
    )
}

/// Executes `unreachable`.
pub fn trap() -> String {
    module(r#"(func (export "_start") unreachable)"#)
}

/// Recurses without end.
pub fn stack_overflow() -> String {
    module(
        r#"(func $down (param i32) (result i32) (call $down (i32.add (local.get 0) (i32.const 1))))
           (func (export "_start") (drop (call $down (i32.const 0))))"#,
    )
}

/// Creates `fill` in the first preopened directory and writes `chunks`
/// chunks of 32 KiB to it, then exits 0; exits with the WASI errno if a call
/// fails.
pub fn fill_scratch(chunks: u32) -> String {
    module(&format!(
        r#"(data (i32.const 64) "fill")
           (func (export "_start") (local $fd i32) (local $n i32) (local $err i32)
             (local.set $err
               (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 4)
                 (i32.const 1) (i64.const 0x7ffffff) (i64.const 0x7ffffff) (i32.const 0) (i32.const 128)))
             (if (local.get $err) (then (call $proc_exit (local.get $err))))
             (local.set $fd (i32.load (i32.const 128)))
             (loop $more
               (i32.store (i32.const 0) (i32.const 16384))
               (i32.store (i32.const 4) (i32.const 32768))
               (local.set $err
                 (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
               (if (local.get $err) (then (call $proc_exit (local.get $err))))
               (local.set $n (i32.add (local.get $n) (i32.const 1)))
               (br_if $more (i32.lt_u (local.get $n) (i32.const {chunks})))))"#
    ))
}

/// Makes a symlink `link` to `target` in the first preopened directory,
/// then opens `link`, following it. Exits 1 when the symlink is refused, 2
/// when opening through it is, 0 when it opened.
pub fn symlink_out(target: &str) -> String {
    let len = target.len();
    module(&format!(
        r#"(data (i32.const 64) "link")
           (data (i32.const 256) "{target}")
           (func (export "_start") (local $err i32)
             (local.set $err
               (call $path_symlink (i32.const 256) (i32.const {len}) (i32.const 3) (i32.const 64) (i32.const 4)))
             (if (local.get $err) (then (call $proc_exit (i32.const 1))))
             (if (call $path_open (i32.const 3) (i32.const 1) (i32.const 64) (i32.const 4)
                   (i32.const 0) (i64.const 0x7ffffff) (i64.const 0x7ffffff) (i32.const 0) (i32.const 128))
               (then (call $proc_exit (i32.const 2)))))"#
    ))
}

/// Reads `from` (up to 60,000 bytes) in the first preopened directory,
/// prints it and writes it to a new file `to` there. Exits 1 when `from`
/// cannot be opened, 2 when `to` cannot be created.
pub fn cat_to(from: &str, to: &str) -> String {
    copy_into(
        &format!(
            r#"(if (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const {})
                  (i32.const 0) (i64.const 0x7ffffff) (i64.const 0x7ffffff) (i32.const 0) (i32.const 128))
                (then (call $proc_exit (i32.const 1))))
              (local.set $in (i32.load (i32.const 128)))"#,
            from.len()
        ),
        from,
        to,
    )
}

/// Prints the file `path` (up to 60,000 bytes) of the first preopened
/// directory, opened for reading only. Exits 1 when it cannot be opened.
pub fn cat(path: &str) -> String {
    let len = path.len();
    module(&format!(
        r#"(data (i32.const 64) "{path}")
           (func (export "_start")
             (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const {len})
                   (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 128))
               (then (call $proc_exit (i32.const 1))))
             (i32.store (i32.const 16) (i32.const 4096))
             (i32.store (i32.const 20) (i32.const 60000))
             (drop (call $fd_read (i32.load (i32.const 128)) (i32.const 16) (i32.const 1) (i32.const 24)))
             (call $write (i32.const 1) (i32.const 4096) (i32.load (i32.const 24))))"#
    ))
}

/// Creates the file `path` in the first preopened directory for writing
/// and exits with the WASI errno (0 when it was made).
pub fn create(path: &str) -> String {
    let len = path.len();
    module(&format!(
        r#"(data (i32.const 64) "{path}")
           (func (export "_start")
             (call $proc_exit (call $path_open (i32.const 3) (i32.const 0) (i32.const 64) (i32.const {len})
                   (i32.const 1) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 128))))"#
    ))
}

/// Copies stdin (up to 60,000 bytes) to stdout and to a new file `to` in
/// the first preopened directory. Exits 2 when `to` cannot be created.
pub fn stdin_to(to: &str) -> String {
    copy_into("(local.set $in (i32.const 0))", "", to)
}

fn copy_into(open_input: &str, from: &str, to: &str) -> String {
    let to_len = to.len();
    module(&format!(
        r#"(data (i32.const 64) "{from}")
           (data (i32.const 1024) "{to}")
           (func (export "_start") (local $in i32) (local $n i32)
             {open_input}
             (i32.store (i32.const 16) (i32.const 4096))
             (i32.store (i32.const 20) (i32.const 60000))
             (drop (call $fd_read (local.get $in) (i32.const 16) (i32.const 1) (i32.const 24)))
             (local.set $n (i32.load (i32.const 24)))
             (call $write (i32.const 1) (i32.const 4096) (local.get $n))
             (if (call $path_open (i32.const 3) (i32.const 0) (i32.const 1024) (i32.const {to_len})
                   (i32.const 9) (i64.const 0x7ffffff) (i64.const 0x7ffffff) (i32.const 0) (i32.const 132))
               (then (call $proc_exit (i32.const 2))))
             (call $write (i32.load (i32.const 132)) (i32.const 4096) (local.get $n)))"#
    ))
}

/// Makes a symlink `link` to `target` in the first preopened directory and
/// exits with the WASI errno (0 when it was made).
pub fn symlink_to(target: &str) -> String {
    let len = target.len();
    module(&format!(
        r#"(data (i32.const 64) "link")
           (data (i32.const 256) "{target}")
           (func (export "_start")
             (call $proc_exit
               (call $path_symlink (i32.const 256) (i32.const {len}) (i32.const 3) (i32.const 64) (i32.const 4))))"#
    ))
}

/// Takes a long time to compile: `functions` functions of arithmetic.
pub fn slow_to_compile(functions: u32) -> String {
    let body =
        "(local.set 0 (i32.add (i32.mul (local.get 0) (i32.const 31)) (i32.const 7)))".repeat(200);
    let mut text = String::new();
    for i in 0..functions {
        text.push_str(&format!(
            "(func $f{i} (param i32) (result i32) {body} (local.get 0))\n"
        ));
    }
    module(&format!(r#"{text} (func (export "_start"))"#))
}

/// A fresh directory name under the system's temporary directory, for
/// tests that need a root of their own.
pub fn temp_root(prefix: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{prefix}-{:032x}", rand::random::<u128>()))
}
