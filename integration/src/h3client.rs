//! A real HTTP/3 client (quinn and h3) for the QUIC tests: long-lived connections, each sending
//! a request at a steady rate, every answer's generation recorded, so that a test sees whether a
//! connection was served to its end by the generation that accepted it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// One connection's life.
#[derive(Debug, Clone)]
pub struct Connection {
    pub started: Instant,
    /// The generation of each answer, in order (`None`: the request failed).
    pub answers: Vec<Option<u64>>,
    /// Why the connection ended early, if it did.
    pub broke: Option<String>,
}

impl Connection {
    /// The generation that took it: its first answer's.
    pub fn generation(&self) -> Option<u64> {
        self.answers.first().copied().flatten()
    }

    /// Served to its end, every answer by the generation that took it.
    pub fn whole(&self) -> bool {
        self.broke.is_none()
            && !self.answers.is_empty()
            && self.answers.iter().all(|g| *g == self.generation())
    }

    pub fn failed(&self) -> usize {
        self.answers.iter().filter(|g| g.is_none()).count()
    }
}

/// The server's certificate is the example's own, made at its start: the tests trust any.
#[derive(Debug)]
struct TrustAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for TrustAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAny(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).expect("a QUIC client configuration"),
    ))
}

/// One connection to `addr`: a request every `every` for `life`, then a clean close. A request
/// unanswered after `patience` breaks it.
async fn connection(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    life: Duration,
    (every, patience): (Duration, Duration),
) -> Connection {
    let mut c = Connection {
        started: Instant::now(),
        answers: Vec::new(),
        broke: None,
    };
    let connecting = match endpoint.connect(addr, "localhost") {
        Ok(connecting) => connecting,
        Err(e) => {
            c.broke = Some(format!("connect: {e}"));
            return c;
        }
    };
    let conn = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            c.broke = Some(format!("handshake: {e}"));
            return c;
        }
        Err(_) => {
            c.broke = Some("handshake: timed out".into());
            return c;
        }
    };
    let (mut driver, mut send) =
        match h3::client::new(h3_quinn::Connection::new(conn.clone())).await {
            Ok(pair) => pair,
            Err(e) => {
                c.broke = Some(format!("h3: {e}"));
                return c;
            }
        };
    let driving = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    let mut tick = tokio::time::interval(every);
    while c.started.elapsed() < life {
        tick.tick().await;
        let answer = tokio::time::timeout(patience, request(&mut send, addr)).await;
        match answer {
            Ok(Ok(generation)) => c.answers.push(Some(generation)),
            Ok(Err(e)) => {
                c.answers.push(None);
                c.broke = Some(e);
                break;
            }
            Err(_) => {
                c.answers.push(None);
                c.broke = Some("request: timed out".into());
                break;
            }
        }
    }
    conn.close(0u32.into(), b"done");
    driving.abort();
    c
}

/// One GET: the answer's generation.
async fn request(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>,
    addr: SocketAddr,
) -> Result<u64, String> {
    let request = http::Request::get(format!("https://localhost:{}/", addr.port()))
        .body(())
        .map_err(|e| e.to_string())?;
    let mut stream = send
        .send_request(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    // A server that answered before reading the request's end may stop the client's sending
    // (RFC 9114, 4.1: "Clients MUST NOT discard complete responses as a result of having their
    // request terminated abruptly"): the answer is read all the same, and the stop counts only
    // if no answer comes.
    let finished = stream.finish().await.map_err(|e| format!("finish: {e}"));
    let response = match stream.recv_response().await {
        Ok(response) => response,
        Err(e) => return Err(finished.err().unwrap_or(format!("response: {e}"))),
    };
    while stream
        .recv_data()
        .await
        .map_err(|e| format!("body: {e}"))?
        .is_some()
    {}
    response
        .headers()
        .get("x-baton-generation")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .ok_or_else(|| format!("no generation in {:?}", response.headers()))
}

/// `clients` clients, each running connections of `life` (a request every `every`, each given
/// `patience` for its answer) back to back until `stop`, staggered so that connections start
/// all along. Bounded: 2 minutes.
pub fn run(
    addr: SocketAddr,
    clients: usize,
    life: Duration,
    (every, patience): (Duration, Duration),
    stop: Arc<AtomicBool>,
) -> Vec<Connection> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the HTTP/3 clients");
    runtime.block_on(async move {
        let mut tasks = Vec::new();
        for i in 0..clients {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(life * i as u32 / clients as u32).await; // the spread
                let mut endpoint =
                    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("a UDP socket");
                endpoint.set_default_client_config(client_config());
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut done = Vec::new();
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    done.push(connection(&endpoint, addr, life, (every, patience)).await);
                }
                endpoint.wait_idle().await;
                done
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all
    })
}

/// The HTTP/3 example (`h3-worker`, quinn and h3, or `command`) under baton on UDP `port`,
/// steered (`quic`) or on one shared socket, the worker's environment `env` (YAML).
pub fn h3_worker_yaml(port: u16, quic: bool, command: &std::path::Path, env: &str) -> String {
    format!(
        "listeners:
  - name: h3
    address: \"127.0.0.1:{port}\"
    kind: udp
    quic: {quic}
worker:
  command: \"{}\"
  env: {env}
  ready_timeout: 5s
  drain_timeout: 10s
supervisor:
  max_draining: 32
  runtime_dir: \"{{dir}}/run\"
  control:
    socket: \"{{dir}}/baton.sock\"
",
        command.display()
    )
}
