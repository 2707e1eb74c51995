//! `sqlx::migrate!` embeds the migrations when the crate is compiled, and
//! Cargo reruns it only when a file it knows changes: a migration added
//! without a change to the Rust source would otherwise be left out.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
