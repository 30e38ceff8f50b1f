//! A tiny stand-in for the Hugging Face Hub, for tests: an HTTP/1.1 server on 127.0.0.1 answering
//! `GET`/`HEAD /{org}/{name}/resolve/{revision}/{file}` like huggingface.co does for the `hf-hub` client
//! (`ETag`, `X-Repo-Commit`, `Content-Length`, `Range` → `206` + `Content-Range`, `404` for unknown files,
//! `401` without the right token when one is required). One connection at a time, `Connection: close`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One repository served by [`HubServer`].
#[derive(Clone)]
pub struct ServedRepo {
    pub id: String,
    pub commit: String,
    pub files: HashMap<String, Vec<u8>>,
    /// When set, requests must carry `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Serve `*.safetensors` like the Hub serves LFS files: `302` to an absolute CDN URL, with the content hash in
    /// `X-Linked-Etag` (the `ETag` of the redirect is the git object id) and `X-Linked-Size`.
    pub lfs_redirect: bool,
}

impl ServedRepo {
    /// A repository with the files of `dir` (non-recursive).
    pub fn from_dir(id: &str, commit: &str, dir: &Path) -> Self {
        let files = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        ServedRepo {
            id: id.into(),
            commit: commit.into(),
            files,
            token: None,
            lfs_redirect: false,
        }
    }
}

/// What a request looked like.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
}

/// The content hash the server uses as ETag (FNV-1a 64, hex; opaque to the client like the Hub's sha256).
pub fn etag_of(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}{:016x}", bytes.len())
}

pub struct HubServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    log: Arc<Mutex<Vec<LoggedRequest>>>,
}

impl HubServer {
    pub fn start(repos: Vec<ServedRepo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2) = (stop.clone(), log.clone());
        let repos: HashMap<String, ServedRepo> =
            repos.into_iter().map(|r| (r.id.clone(), r)).collect();
        let handle = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = conn {
                    let _ = serve(stream, addr, &repos, &log2);
                }
            }
        });
        HubServer {
            addr,
            stop,
            handle: Some(handle),
            log,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.log.lock().unwrap().clone()
    }

    /// Stops the server; its port refuses connections afterwards.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(h) = self.handle.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr); // wake the accept loop
            let _ = h.join();
        }
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn serve(
    stream: TcpStream,
    addr: SocketAddr,
    repos: &HashMap<String, ServedRepo>,
    log: &Mutex<Vec<LoggedRequest>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    log.lock().unwrap().push(LoggedRequest {
        method: method.clone(),
        path: path.clone(),
        headers: headers.clone(),
    });
    let mut out = stream;
    let respond =
        |out: &mut TcpStream, status: &str, extra: &[(String, String)], body: &[u8], head: bool| {
            let mut r = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in extra {
                r.push_str(&format!("{k}: {v}\r\n"));
            }
            r.push_str("\r\n");
            out.write_all(r.as_bytes())?;
            if !head {
                out.write_all(body)?;
            }
            out.flush()
        };
    let head = method == "HEAD";
    if method != "GET" && !head {
        return respond(&mut out, "405 Method Not Allowed", &[], b"", false);
    }
    // The CDN: /cdn/{org}/{name}/{file}, no auth, no commit header.
    if let Some(rest) = path.strip_prefix("/cdn/") {
        let parts: Vec<&str> = rest.splitn(3, '/').collect();
        let body = (parts.len() == 3)
            .then(|| repos.get(&format!("{}/{}", parts[0], parts[1])))
            .flatten()
            .and_then(|r| r.files.get(parts[2]));
        return match body {
            Some(body) => send_body(&mut out, body, &headers, vec![], head, respond),
            None => respond(&mut out, "404 Not Found", &[], b"", head),
        };
    }
    // /{org}/{name}/resolve/{rev}/{file}
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let not_found = |out: &mut TcpStream, code: &str| {
        respond(
            out,
            "404 Not Found",
            &[("X-Error-Code".into(), code.into())],
            b"Not Found",
            head,
        )
    };
    if segs.len() != 5 || segs[2] != "resolve" {
        return not_found(&mut out, "RepoNotFound");
    }
    let id = format!("{}/{}", segs[0], segs[1]);
    let Some(repo) = repos.get(&id) else {
        return not_found(&mut out, "RepoNotFound");
    };
    if let Some(t) = &repo.token {
        if headers.get("authorization") != Some(&format!("Bearer {t}")) {
            return respond(
                &mut out,
                "401 Unauthorized",
                &[("X-Error-Code".into(), "GatedRepo".into())],
                b"Unauthorized",
                head,
            );
        }
    }
    let commit_hdr = ("X-Repo-Commit".to_string(), repo.commit.clone());
    if segs[3] != "main" && segs[3] != repo.commit {
        return respond(
            &mut out,
            "404 Not Found",
            &[("X-Error-Code".into(), "RevisionNotFound".into())],
            b"",
            head,
        );
    }
    let Some(body) = repo.files.get(segs[4]) else {
        return respond(
            &mut out,
            "404 Not Found",
            &[("X-Error-Code".into(), "EntryNotFound".into()), commit_hdr],
            b"",
            head,
        );
    };
    if repo.lfs_redirect && segs[4].ends_with(".safetensors") {
        let hdrs = vec![
            (
                "Location".to_string(),
                format!("http://{addr}/cdn/{id}/{}", segs[4]),
            ),
            (
                "X-Linked-Etag".to_string(),
                format!("\"{}\"", etag_of(body)),
            ),
            ("X-Linked-Size".to_string(), body.len().to_string()),
            (
                "ETag".to_string(),
                "\"0000000000000000000000000000000000000000\"".to_string(),
            ),
            commit_hdr,
        ];
        return respond(&mut out, "302 Found", &hdrs, b"", head);
    }
    let hdrs = vec![
        ("ETag".to_string(), format!("\"{}\"", etag_of(body))),
        commit_hdr,
    ];
    send_body(&mut out, body, &headers, hdrs, head, respond)
}

/// `200` with the whole body, or `206` with the requested `Range` (`bytes=a-b` / `bytes=a-`), or `416`.
fn send_body<F>(
    out: &mut TcpStream,
    body: &[u8],
    headers: &HashMap<String, String>,
    mut hdrs: Vec<(String, String)>,
    head: bool,
    respond: F,
) -> std::io::Result<()>
where
    F: Fn(&mut TcpStream, &str, &[(String, String)], &[u8], bool) -> std::io::Result<()>,
{
    let total = body.len();
    hdrs.push(("Accept-Ranges".to_string(), "bytes".to_string()));
    match headers.get("range").and_then(|r| r.strip_prefix("bytes=")) {
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = if b.is_empty() {
                total.saturating_sub(1)
            } else {
                b.parse().unwrap_or(0).min(total.saturating_sub(1))
            };
            if a >= total || b < a {
                hdrs.push(("Content-Range".into(), format!("bytes */{total}")));
                return respond(out, "416 Range Not Satisfiable", &hdrs, b"", head);
            }
            hdrs.push(("Content-Range".into(), format!("bytes {a}-{b}/{total}")));
            respond(out, "206 Partial Content", &hdrs, &body[a..=b], head)
        }
        None => respond(out, "200 OK", &hdrs, body, head),
    }
}
