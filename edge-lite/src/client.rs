//! A client of the admin API, for the `tether-edge` CLI: HTTP/1.1 through
//! hyper's client (the same library as the server, on smol through
//! smol-hyper), over TCP, HTTPS (rustls, verified against a CA file) or a
//! unix socket. One connection per [`Client`], one request at a time,
//! JSON in and out; every request is bounded by [`Client::timeout`].
//!
//! The API key travels only in the `Authorization` header; this module
//! never logs or prints it (see [`ApiKey`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use futures_lite::future;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use smol_hyper::rt::FuturesIo;

use crate::wire;

/// The largest answer read (a page of the API's largest list is far less).
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Where the API listens: `http://HOST:PORT`, `https://HOST:PORT` or
/// `unix:/PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiUrl {
    /// Plain HTTP over TCP (the API allows it on loopback only).
    Http {
        /// A name or an address.
        host: String,
        /// The port.
        port: u16,
    },
    /// HTTPS over TCP; the certificate must name `host`.
    Https {
        /// A name or an address.
        host: String,
        /// The port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

impl ApiUrl {
    /// Parses an API address as `--api` takes it. A path, a query or a
    /// missing port is refused: the API has no default port and no prefix.
    pub fn parse(s: &str) -> Result<ApiUrl, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: a unix socket needs an absolute path (unix:/run/tether-edge/api.sock)"
                ));
            }
            return Ok(ApiUrl::Unix(PathBuf::from(path)));
        }
        let uri: hyper::Uri = s.parse().map_err(|e| format!("{s:?}: not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(format!(
                    "{s:?}: need http://HOST:PORT, https://HOST:PORT or unix:/PATH"
                ))
            }
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!("{s:?}: the API's address has no path or query"));
        }
        let host = uri
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        let port = uri
            .port_u16()
            .ok_or_else(|| format!("{s:?}: no port (the API's is in [api] listen)"))?;
        let host = host.to_owned();
        Ok(if https {
            ApiUrl::Https { host, port }
        } else {
            ApiUrl::Http { host, port }
        })
    }

    /// The URL of the API that `[api] listen` describes, as a client on
    /// the same host reaches it: a wildcard address becomes loopback.
    pub fn of_listener(listen: &crate::config::ApiListen, https: bool) -> ApiUrl {
        match listen {
            crate::config::ApiListen::Unix(p) => ApiUrl::Unix(p.clone()),
            crate::config::ApiListen::Tcp(a) => {
                let ip = match a.ip() {
                    std::net::IpAddr::V4(v) if v.is_unspecified() => {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    }
                    std::net::IpAddr::V6(v) if v.is_unspecified() => {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    }
                    ip => ip,
                };
                let (host, port) = (ip.to_string(), a.port());
                if https {
                    ApiUrl::Https { host, port }
                } else {
                    ApiUrl::Http { host, port }
                }
            }
        }
    }

    /// The `Host` header.
    fn authority(&self) -> String {
        match self {
            ApiUrl::Http { host, port } | ApiUrl::Https { host, port } if host.contains(':') => {
                format!("[{host}]:{port}")
            }
            ApiUrl::Http { host, port } | ApiUrl::Https { host, port } => format!("{host}:{port}"),
            ApiUrl::Unix(_) => "localhost".to_owned(),
        }
    }
}

impl fmt::Display for ApiUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiUrl::Http { .. } => write!(f, "http://{}", self.authority()),
            ApiUrl::Https { .. } => write!(f, "https://{}", self.authority()),
            ApiUrl::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// An API key (`ak_<id>.<secret>`); its `Debug` and `Display` show the id
/// only.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Checks the shape (`ak_`, an id, `.`, a secret; no whitespace inside).
    /// `from` names where it came from, for the error; the error never
    /// holds the key.
    pub fn parse(s: &str, from: &str) -> Result<ApiKey, String> {
        let s = s.trim();
        let ok = s.starts_with("ak_")
            && s.split_once('.')
                .is_some_and(|(id, sec)| id.len() > 3 && !sec.is_empty())
            && s.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(ApiKey(s.to_owned()))
        } else {
            Err(format!(
                "{from}: not an API key (ak_<id>.<secret>, as apikey create printed it)"
            ))
        }
    }

    /// The public id (`ak_…`).
    pub fn id(&self) -> &str {
        self.0.split_once('.').map_or("", |(id, _)| id)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({})", self.id())
    }
}

/// Why a call failed.
#[derive(Debug)]
pub enum ClientError {
    /// The API could not be reached, or the connection failed.
    Connect(String),
    /// HTTPS: the certificate or the CA file.
    Tls(String),
    /// No answer within the timeout.
    Timeout(Duration),
    /// The API answered with an error (its `Error` body).
    Api {
        /// The HTTP status.
        status: u16,
        /// The stable code (`not_found`, `forbidden`, …).
        code: String,
        /// The API's message.
        message: String,
    },
    /// An answer that is not what the document describes.
    Answer(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(m) | ClientError::Tls(m) | ClientError::Answer(m) => {
                f.write_str(m)
            }
            ClientError::Timeout(d) => write!(f, "the API did not answer within {} s", d.as_secs()),
            ClientError::Api {
                status,
                code,
                message,
            } => write!(f, "{message} (HTTP {status}, {code})"),
        }
    }
}

impl std::error::Error for ClientError {}

/// One connection to the API.
pub struct Client {
    url: ApiUrl,
    key: Option<ApiKey>,
    ca: Option<PathBuf>,
    /// Each request (connecting included) gets this long.
    pub timeout: Duration,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl Client {
    /// A client of `url` (nothing is dialled yet). HTTPS needs `ca`, the
    /// PEM certificates to verify the API's certificate with.
    pub fn new(url: ApiUrl, key: Option<ApiKey>, ca: Option<PathBuf>) -> Client {
        Client {
            url,
            key,
            ca,
            timeout: Duration::from_secs(30),
            conn: None,
        }
    }

    /// The API's address.
    pub fn url(&self) -> &ApiUrl {
        &self.url
    }

    /// `GET path` (with its query), answered with a `T`.
    pub fn get<T: DeserializeOwned>(&mut self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, None::<&()>)
    }

    /// `method path` with `body` as JSON, answered with a `T`.
    pub fn call<T: DeserializeOwned, B: Serialize>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = match body {
            Some(b) => Some(
                serde_json::to_vec(b).map_err(|e| ClientError::Answer(format!("request: {e}")))?,
            ),
            None => None,
        };
        let timeout = self.timeout;
        let (status, bytes) =
            smol::block_on(future::or(self.send(method.clone(), path, body), async {
                smol::Timer::after(timeout).await;
                Err(ClientError::Timeout(timeout))
            }))
            .inspect_err(|_| self.conn = None)?;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| {
                ClientError::Answer(format!(
                    "{method} {path}: the answer is not the documented JSON: {e}"
                ))
            })
        } else {
            Err(match serde_json::from_slice::<wire::Error>(&bytes) {
                Ok(e) => ClientError::Api {
                    status: status.as_u16(),
                    code: e.error,
                    message: e.message,
                },
                Err(_) => ClientError::Answer(format!(
                    "{method} {path}: HTTP {status} without the API's error body (is {} the edge's API?)",
                    self.url
                )),
            })
        }
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            self.conn = Some(self.connect().await?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(ClientError::Connect("no connection".into()));
        };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, self.url.authority());
        if let Some(k) = &self.key {
            req = req.header(AUTHORIZATION, format!("Bearer {}", k.0));
        }
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Answer(format!("{method} {path}: {e}")))?;
        conn.ready()
            .await
            .map_err(|e| ClientError::Connect(format!("{}: {e}", self.url)))?;
        let resp = conn
            .send_request(req)
            .await
            .map_err(|e| ClientError::Connect(format!("{method} {path} at {}: {e}", self.url)))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| ClientError::Answer(format!("{method} {path}: reading the answer: {e}")))?
            .to_bytes();
        Ok((status, bytes))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let cannot = |e: std::io::Error| {
            ClientError::Connect(format!("cannot reach the API at {}: {e}", self.url))
        };
        match &self.url {
            ApiUrl::Unix(p) => {
                let s = smol::net::unix::UnixStream::connect(p)
                    .await
                    .map_err(cannot)?;
                handshake(s).await
            }
            ApiUrl::Http { host, port } => {
                let s = smol::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(cannot)?;
                handshake(s).await
            }
            ApiUrl::Https { host, port } => {
                let Some(ca) = &self.ca else {
                    return Err(ClientError::Tls(format!(
                        "{}: HTTPS needs the CA that signed the API's certificate (--api-ca PEM or TETHER_API_CA)",
                        self.url
                    )));
                };
                let tls = crate::tls::api_client(ca).map_err(ClientError::Tls)?;
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| ClientError::Tls(format!("{host:?}: {e}")))?;
                let s = smol::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(cannot)?;
                let s = futures_rustls::TlsConnector::from(tls)
                    .connect(name, s)
                    .await
                    .map_err(|e| ClientError::Tls(format!("TLS with {}: {e}", self.url)))?;
                handshake(s).await
            }
        }
    }
}

async fn handshake<S>(s: S) -> Result<SendRequest<Full<Bytes>>, ClientError>
where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Send + Unpin + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(FuturesIo::new(s))
        .await
        .map_err(|e| ClientError::Connect(format!("HTTP handshake: {e}")))?;
    smol::spawn(async move {
        if let Err(e) = conn.await {
            log::debug!("api client: connection: {e}");
        }
    })
    .detach();
    Ok(send)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            ApiUrl::parse("http://127.0.0.1:7070").unwrap(),
            ApiUrl::Http {
                host: "127.0.0.1".into(),
                port: 7070
            }
        );
        let v6 = ApiUrl::parse("https://[::1]:7443/").unwrap();
        assert_eq!(v6.to_string(), "https://[::1]:7443");
        assert_eq!(
            ApiUrl::parse("unix:/run/api.sock").unwrap(),
            ApiUrl::Unix("/run/api.sock".into())
        );
        for bad in [
            "127.0.0.1:7070",
            "http://127.0.0.1",
            "ftp://h:1",
            "http://h:1/v1",
            "http://h:1/?a=b",
            "unix:api.sock",
        ] {
            assert!(ApiUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcard_listeners_are_reached_on_loopback() {
        let l = crate::config::ApiListen::parse("0.0.0.0:7070").unwrap();
        assert_eq!(
            ApiUrl::of_listener(&l, true).to_string(),
            "https://127.0.0.1:7070"
        );
        let l = crate::config::ApiListen::parse("[::]:7070").unwrap();
        assert_eq!(
            ApiUrl::of_listener(&l, false).to_string(),
            "http://[::1]:7070"
        );
    }

    #[test]
    fn keys_never_show_their_secret() {
        let k = ApiKey::parse(" ak_0123456789ab.c2VjcmV0\n", "TETHER_API_KEY").unwrap();
        assert_eq!(k.id(), "ak_0123456789ab");
        assert_eq!(format!("{k:?}"), "ApiKey(ak_0123456789ab)");
        for bad in ["", "tk_0123.abc", "ak_0123", "ak_.x", "ak_01.", "ak_01.a b"] {
            let e = ApiKey::parse(bad, "FILE").unwrap_err();
            assert!(e.starts_with("FILE: not an API key"), "{e}");
        }
    }
}
