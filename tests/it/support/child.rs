//! The proxy binary as a child process, for tests that need real processes (signals, several
//! replicas, captured logs).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

use super::{client, test_engine};

/// A `llmgate serve` child with its own config file and a log of stdout and stderr; killed on drop.
pub struct ChildGateway {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl ChildGateway {
    /// Writes `yaml` to a config file in a fresh directory and starts the binary on the suite's
    /// engine with `env` as its whole environment (plus `PORT`, `HOST`, `NO_COLOR`); waits until
    /// `/health` answers.
    pub async fn spawn(yaml: &str, env: &[(&str, &str)], files: &[(&str, &str)]) -> Self {
        for _attempt in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let dir = std::env::temp_dir().join(format!("llmgate-it-child-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for (name, text) in files {
                std::fs::write(dir.join(name), text).unwrap();
            }
            let yaml = yaml.replace("{DIR}", &dir.display().to_string());
            std::fs::write(dir.join("llmgate.yaml"), yaml).unwrap();
            let stdout = std::fs::File::create(dir.join("stdout")).unwrap();
            let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_llmgate"))
                .arg("serve")
                .arg("--config")
                .arg(dir.join("llmgate.yaml"))
                // The suite's engine, like `TestGateway` (`LLMGATE_TEST_ENGINE`).
                .arg("--engine")
                .arg(engine_name(test_engine()))
                .env_clear()
                .envs(env.iter().copied())
                .env("PORT", port.to_string())
                .env("HOST", "127.0.0.1")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .expect("spawn llmgate");
            let mut gateway = Self { child, port, dir };
            if gateway.wait_healthy().await {
                return gateway;
            }
            eprintln!("llmgate on port {port} exited early: {}", gateway.log());
        }
        panic!("llmgate did not start");
    }

    async fn wait_healthy(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            let req = Request::get(self.url("/health")).body(Full::<Bytes>::default()).unwrap();
            if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(1), client().request(req)).await
                && response.status() == StatusCode::OK
            {
                return true;
            }
            assert!(tokio::time::Instant::now() < deadline, "llmgate never became healthy: {}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// stdout then stderr, as written so far.
    pub fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("{}{}", read("stdout"), read("stderr"))
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (`TERM`, `HUP`, …).
    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit (fails after 30 s).
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "llmgate did not exit: {}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The `--engine` value of `engine`.
fn engine_name(engine: llmgate::config::Engine) -> &'static str {
    match engine {
        llmgate::config::Engine::Hyper => "hyper",
        llmgate::config::Engine::Pingora => "pingora",
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// === The test ===
