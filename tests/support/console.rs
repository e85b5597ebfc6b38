//! `kubectl covi console` driven by a test: a child process whose output is collected
//! and whose input the test types.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::wait_until;

/// Ctrl-]: ends a console session.
pub const ESCAPE: u8 = 0x1d;

/// `kubectl covi console` as a child process with its stdout collected.
pub struct Session {
    child: tokio::process::Child,
    stdin: Arc<tokio::sync::Mutex<tokio::process::ChildStdin>>,
    output: Arc<Mutex<String>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Session {
    pub fn start(args: &[&str]) -> Session {
        let mut child = tokio::process::Command::new("kubectl")
            .args(args)
            .env("PATH", crate::plugin_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("kubectl runs");
        let output = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        for mut pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = output.clone();
            readers.push(tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }));
        }
        let stdin = Arc::new(tokio::sync::Mutex::new(child.stdin.take().expect("stdin")));
        Session { child, stdin, output, readers }
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Types `tag` and a number every few seconds until the guest echoes such a line;
    /// returns the echo.
    pub async fn echo(&self, tag: &str, deadline: Duration) -> String {
        let typed = Mutex::new(Instant::now() - Duration::from_secs(60));
        let n = std::sync::atomic::AtomicU32::new(0);
        wait_until(&format!("the guest to echo {tag:?} typed into its console"), deadline, || async {
            let wanted = format!("guest got: {tag}");
            if let Some(line) = self.output().lines().find(|l| l.contains(&wanted)) {
                return Some(line.to_string());
            }
            let due = typed.lock().unwrap().elapsed() > Duration::from_secs(3);
            if due {
                *typed.lock().unwrap() = Instant::now();
                let n = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.type_bytes(format!("{tag} {n}\n").as_bytes()).await;
            }
            None
        })
        .await
    }

    /// Waits for the command to exit; its status and everything it printed.
    pub async fn ended(mut self) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("kubectl covi console did not end:\n{}", self.output()))
            .expect("exit status");
        // Its pipes closed with it: the readers finish with its last bytes.
        for reader in self.readers.drain(..) {
            let _ = reader.await;
        }
        (status, self.output())
    }

    pub async fn type_bytes(&self, bytes: &[u8]) {
        let mut stdin = self.stdin.lock().await;
        stdin.write_all(bytes).await.expect("typing into kubectl covi console");
        stdin.flush().await.expect("flush");
    }
}
