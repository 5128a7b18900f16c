// `sqlx::migrate!` embeds `migrations/` when `shared` compiles; without this, a migration added
// or changed on its own would not rebuild it, and binaries would run the schema before it.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
