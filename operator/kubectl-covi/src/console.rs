//! `kubectl covi console NAME`: the server's serial console in this terminal, through
//! the API server (which checks RBAC on `virtualservers/console`) and covi-operator to
//! the agent on the server's host. Ctrl-] ends the session, as in `virsh console`.

use std::io::{IsTerminal, Write};

use covi_api::console::{ERROR, GROUP, RESOURCE, STDIN, STDOUT, SUBRESOURCE};
use futures::{SinkExt, StreamExt};
use kube::Client;
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// Ctrl-]: ends the session.
const ESCAPE: u8 = 0x1d;

pub async fn attach(client: &Client, namespace: &str, name: &str, force: bool) -> Result<String, String> {
    let mut path = covi_api::console::path(namespace, name);
    if force {
        path.push_str("?force=true");
    }
    let request = http::Request::get(&path).body(Vec::new()).map_err(|e| e.to_string())?;
    let connection = client.connect(request).await.map_err(|e| explain(e, namespace, name))?;
    let (mut to_server, mut from_server) = connection.into_stream().split();
    let terminal = std::io::stdin().is_terminal();
    if terminal {
        eprint!("Connected to the serial console of virtualserver {namespace}/{name}. Escape character is ^]\r\n");
    }
    let raw = terminal.then(RawMode::enter).flatten();
    let mut stdin = keys();
    let mut stdout = std::io::stdout();
    let outcome = loop {
        tokio::select! {
            read = stdin.recv() => {
                let Some(typed) = read else { break Ok(()) };
                let (data, escaped) = match typed.iter().position(|&b| b == ESCAPE) {
                    Some(at) => (&typed[..at], true),
                    None => (&typed[..], false),
                };
                if !data.is_empty() {
                    let mut frame = Vec::with_capacity(data.len() + 1);
                    frame.push(STDIN);
                    frame.extend_from_slice(data);
                    if to_server.send(Message::Binary(Bytes::from(frame))).await.is_err() {
                        break Err("the connection to the console broke".to_string());
                    }
                }
                if escaped {
                    break Ok(());
                }
            }
            message = from_server.next() => match message {
                Some(Ok(Message::Binary(data))) => match data.first() {
                    Some(&STDOUT) => {
                        let _ = stdout.write_all(&data[1..]);
                        let _ = stdout.flush();
                    }
                    Some(&ERROR) => break Err(status_message(&data[1..])),
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None => break Ok(()),
                Some(Err(e)) => break Err(format!("the connection to the console broke: {e}")),
                Some(Ok(_)) => {}
            },
        }
    };
    let _ = to_server.send(Message::Close(None)).await;
    drop(raw);
    if terminal {
        eprintln!();
    }
    outcome.map(|()| String::new())
}

/// What is typed, read on a thread of its own: a read of stdin cannot be cancelled,
/// and one pending in tokio's blocking pool would keep the process from exiting when
/// the session ends from the other side.
fn keys() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let _ = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || tx.blocking_send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

/// The message of a `metav1.Status` on the error channel.
fn status_message(json: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(json)
        .ok()
        .and_then(|s| s["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(json).into_owned())
}

/// What went wrong, in terms of what the user can do about it.
fn explain(e: kube::Error, namespace: &str, name: &str) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "you may not open the console of virtualserver {namespace}/{name}: {}\n\
             (it takes RBAC verb `get` on resource `{RESOURCE}/{SUBRESOURCE}` in API group `{GROUP}`)",
            s.message
        ),
        kube::Error::Api(s) if s.code == 404 && !s.message.contains(name) => format!(
            "{}: the API server does not serve covi's console; is it installed? \
             (kubectl get apiservice {})",
            s.message,
            covi_api::console::API_SERVICE
        ),
        kube::Error::Api(s) => s.message,
        other => format!("opening the console of virtualserver {namespace}/{name}: {other}"),
    }
}

/// The terminal in raw mode (keys go to the guest as typed, Ctrl-C included) until
/// dropped.
struct RawMode(libc::termios);

impl RawMode {
    fn enter() -> Option<RawMode> {
        // SAFETY: tcgetattr/tcsetattr on stdin with a termios they fill in.
        unsafe {
            let mut attrs: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut attrs) != 0 {
                return None;
            }
            let saved = attrs;
            libc::cfmakeraw(&mut attrs);
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &attrs) != 0 {
                return None;
            }
            Some(RawMode(saved))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enter`.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_what_to_do() {
        let status = |code, message: &str| {
            kube::Error::Api(
                serde_json::from_value(
                    serde_json::json!({"status": "Failure", "message": message, "reason": "x", "code": code}),
                )
                .unwrap(),
            )
        };
        let forbidden = explain(status(403, "User \"eve\" cannot get resource"), "a", "web");
        assert!(forbidden.contains("virtualservers/console") && forbidden.contains("eve"), "{forbidden}");
        let missing = explain(status(404, "the server could not find the requested resource"), "a", "web");
        assert!(missing.contains("kubectl get apiservice v1alpha1.subresources.covi.io"), "{missing}");
        let no_server = explain(status(404, "virtualservers.covi.io \"web\" not found"), "a", "web");
        assert_eq!(no_server, "virtualservers.covi.io \"web\" not found");
        assert_eq!(status_message(br#"{"message":"the guest stopped"}"#), "the guest stopped");
    }
}
