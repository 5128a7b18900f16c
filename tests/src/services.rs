//! Servers of a test's (or a soak's) own, on ports and in directories of their own, so
//! restarting one disturbs nothing else: Redis, and Postgres through `infra/local/services.sh`.

use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::stack::DatabaseUrls;

/// A Redis server of a test's own, so restarting it disturbs no other test.
pub struct OwnRedis {
    child: Child,
    port: u16,
    persistent: bool,
}

impl OwnRedis {
    /// One without persistence, as `make dev` runs it: a restart loses what it held.
    pub async fn start() -> Self {
        Self::on(free_port(), false).await
    }

    /// One that writes every command to its append-only file, so a restart keeps the data.
    pub async fn start_persistent() -> Self {
        Self::on(free_port(), true).await
    }

    async fn on(port: u16, persistent: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("konstruct-redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let appendonly = if persistent { "yes" } else { "no" };
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", appendonly, "--appendfsync", "always"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server");
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            port,
            persistent,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn restart(mut self) -> Self {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
        Self::on(self.port, self.persistent).await
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Postgres server of this test's own (`infra/local/services.sh` in a directory and on a port
/// of its own), so restarting it disturbs no other test.
pub struct OwnPostgres {
    dir: std::path::PathBuf,
    port: u16,
}

impl OwnPostgres {
    /// Runs `services.sh <command>` for this instance; the command must succeed.
    fn services(&self, command: &str) {
        let out = std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../infra/local/services.sh"
        ))
        .arg(command)
        .env("KONSTRUCT_LOCAL_DIR", &self.dir)
        .env("KONSTRUCT_PG_PORT", self.port.to_string())
        .output()
        .expect("run services.sh");
        assert!(
            out.status.success(),
            "services.sh {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A new cluster with the application role (initdb runs as the postgres OS user as root).
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("konstruct-pg-{port}"));
        let postgres = Self { dir, port };
        postgres.services("up-postgres");
        postgres
    }

    pub fn restart(&self) {
        self.services("restart-postgres");
    }

    pub fn urls(&self) -> DatabaseUrls {
        let url = |role| format!("postgres://{role}@127.0.0.1:{}/konstruct", self.port);
        DatabaseUrls {
            runtime: url("konstruct_app"),
            migrator: url("konstruct_migrator"),
        }
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../infra/local/services.sh"
        ))
        .arg("reset-postgres")
        .env("KONSTRUCT_LOCAL_DIR", &self.dir)
        .env("KONSTRUCT_PG_PORT", self.port.to_string())
        .output();
    }
}
