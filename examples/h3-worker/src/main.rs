//! `h3-worker`: an HTTP/3 server on quinn and h3 for a baton `quic: true` listener
//! (docs/quic.md). It answers every request as `hello-worker` does (`hello from pid P,
//! generation G`, and `x-baton-generation`), issues connection IDs that carry its generation's
//! tag (`baton_worker::quic::TaggedConnectionIds`), so that baton steers its connections' packets
//! to it across reloads, and on a drain request refuses new connections and serves the ones it
//! has until they close (baton kills it at its drain deadline otherwise).
//!
//! Its certificate is made at start (self-signed, for `localhost`): an example, not a
//! deployment (give a real one with `--cert` and `--key`, PEM files).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use baton_worker::quic::TaggedConnectionIds;
use baton_worker::{Listener, Worker};
use bytes::Bytes;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tracing::{info, warn};

struct Args {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        cert: None,
        key: None,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let value = argv.next().map(PathBuf::from);
        match flag.as_str() {
            "--cert" => a.cert = value,
            "--key" => a.key = value,
            other => bail!("unknown argument {other:?}: h3-worker [--cert PEM --key PEM]"),
        }
    }
    Ok(a)
}

/// The certificate chain and key: from files, or made now for `localhost`.
fn identity(args: &Args) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            use rustls::pki_types::pem::PemObject;
            let certs = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading {}", key.display()))?;
            Ok((certs, key))
        }
        _ => {
            let made = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
            let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
            Ok((vec![made.cert.der().clone()], key.into()))
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    baton_worker::log::to_stderr();
    let args = args()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut worker = Worker::from_env()
        .await
        .context("receiving listeners from baton")?;
    let socket = worker
        .take_all()
        .into_iter()
        .find_map(|(_, l)| match l {
            Listener::Udp(socket) => Some(socket),
            _ => None,
        })
        .context("h3-worker needs a UDP listener (kind: udp, quic: true)")?;
    let socket = socket.into_std()?;

    let (certs, key) = identity(&args)?;
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let server = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    let mut endpoint_config = quinn::EndpointConfig::default();
    match worker.quic_tag() {
        Some(tag) => {
            endpoint_config.cid_generator(move || Box::new(TaggedConnectionIds::new(tag)));
        }
        None => warn!("no QUIC tag (not `quic: true`): connections will not survive a reload"),
    }
    let endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;

    let generation = worker.generation();
    let pid = std::process::id();
    let body = Bytes::from(format!("hello from pid {pid}, generation {generation}\n"));
    worker.ready().await.context("reporting ready")?;
    info!("h3-worker pid {pid} generation {generation} ready");

    let mut drain = worker.drain_watch();
    loop {
        tokio::select! {
            reason = drain.requested() => {
                info!("pid {pid} draining ({reason}): no new connections, {} open",
                    endpoint.open_connections());
                break;
            }
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let body = body.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(incoming, body, generation).await {
                        warn!("connection: {e:#}");
                    }
                });
            }
        }
    }
    endpoint.set_server_config(None);
    endpoint.wait_idle().await;
    info!("pid {pid} drained: exiting");
    Ok(())
}

/// One connection: every request answered with `body`.
async fn serve(incoming: quinn::Incoming, body: Bytes, generation: u64) -> anyhow::Result<()> {
    let connection = incoming.await?;
    let mut h3 =
        h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(connection)).await?;
    loop {
        match h3.accept().await {
            Ok(Some(resolver)) => {
                let body = body.clone();
                tokio::spawn(async move {
                    let Ok((_request, mut stream)) = resolver.resolve_request().await else {
                        return;
                    };
                    // The request to its end (a GET's is its headers): answering before it
                    // would stop the client's sending, which a client may take for a failure.
                    while let Ok(Some(_)) = stream.recv_data().await {}
                    let response = http::Response::builder()
                        .status(http::StatusCode::OK)
                        .header("content-type", "text/plain")
                        .header("x-baton-generation", generation.to_string())
                        .body(())
                        .unwrap_or_default();
                    if stream.send_response(response).await.is_ok()
                        && stream.send_data(body).await.is_ok()
                    {
                        let _ = stream.finish().await;
                    }
                });
            }
            // The client closed the connection (or it failed): done.
            Ok(None) | Err(_) => return Ok(()),
        }
    }
}
