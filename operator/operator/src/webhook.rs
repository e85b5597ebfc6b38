//! Notifications: a JSON POST to the pool's webhook URL when a request is fulfilled or
//! about to expire. Plain HTTP/1.1 over TCP; https URLs are refused with a clear error
//! (no TLS client here yet).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Splits http://host:port/path into (host:port, path).
fn target(url: &str) -> Result<(String, String), String> {
    let rest = match url.strip_prefix("http://") {
        Some(rest) => rest,
        None if url.starts_with("https://") => return Err("https webhooks are not supported yet; use http".into()),
        None => return Err("the webhook URL must start with http://".into()),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    Ok((authority, path.to_string()))
}

/// POSTs `body` as JSON; an answer other than 2xx is an error.
pub async fn post(url: &str, body: &serde_json::Value) -> Result<(), String> {
    let (authority, path) = target(url)?;
    let payload = body.to_string();
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&authority).await.map_err(|e| e.to_string())?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{payload}",
            payload.len()
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.map_err(|e| e.to_string())?;
        let status_line = String::from_utf8_lossy(&response).lines().next().unwrap_or_default().to_string();
        match status_line.split_whitespace().nth(1) {
            Some(code) if code.starts_with('2') => Ok(()),
            _ => Err(format!("answered {status_line:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.map_err(|_| "no answer within 5s".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(target("http://127.0.0.1:8080/hook").unwrap(), ("127.0.0.1:8080".into(), "/hook".into()));
        assert_eq!(target("http://hooks.example").unwrap(), ("hooks.example:80".into(), "/".into()));
        assert!(target("https://x").unwrap_err().contains("https webhooks are not supported"));
    }
}

#[cfg(test)]
mod delivery_tests {
    use super::*;

    #[tokio::test]
    async fn posts_json_and_accepts_2xx() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = conn.read(&mut buf).await.unwrap();
            conn.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await.unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        post(&url, &serde_json::json!({"event": "Fulfilled"})).await.expect("delivered");
        let request = server.await.unwrap();
        assert!(request.starts_with("POST /hook HTTP/1.1"), "{request}");
        assert!(request.ends_with("{\"event\":\"Fulfilled\"}"), "{request}");
    }
}
