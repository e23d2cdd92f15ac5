//! The SDK against a master played by the test: handoffs that work and ones that must be refused,
//! drain requests, connection reports.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use baton_proto::{
    Hello, ListenerAddress, ListenerInfo, MAX_MESSAGE_SIZE, MasterMessage, PROTOCOL_VERSION,
    WorkerMessage,
};
use baton_sys::channel;
use tokio::net::UnixDatagram;

use super::*;

fn pair() -> (UnixDatagram, UnixDatagram) {
    let (a, b) = channel::pair().unwrap();
    (
        channel::into_async(a).unwrap(),
        channel::into_async(b).unwrap(),
    )
}

fn tcp_info(name: &str, l: &std::net::TcpListener) -> ListenerInfo {
    ListenerInfo {
        name: name.into(),
        address: ListenerAddress::Tcp {
            address: l.local_addr().unwrap(),
        },
        quic_tag: None,
    }
}

async fn send(master: &UnixDatagram, message: &MasterMessage, fds: &[BorrowedFd<'_>]) {
    channel::send_with_fds(master, &baton_proto::encode(message), fds)
        .await
        .unwrap();
}

/// Sends `count` listeners in one `Fds` message, carrying `fds`.
async fn send_fds(master: &UnixDatagram, count: usize, fds: &[BorrowedFd<'_>]) {
    send(master, &MasterMessage::Fds { first: 0, count }, fds).await;
}

/// A status that reports `n` connections and no text.
fn connections(n: u64) -> WorkerMessage {
    WorkerMessage::Status {
        connections: Some(n),
        text: None,
    }
}

async fn hello(master: &UnixDatagram, listeners: Vec<ListenerInfo>) {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        watchdog_ms: None,
        generation: 4,
        worker_id: 9,
        listeners,
    };
    send(master, &MasterMessage::Hello(hello), &[]).await;
}

async fn next_status(master: &UnixDatagram) -> WorkerMessage {
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    let n = master.recv(&mut buf).await.unwrap();
    baton_proto::decode(&buf[..n]).unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn listeners_arrive_by_name_and_accept_connections() {
    let (master, worker_end) = pair();
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    hello(&master, vec![tcp_info("a", &a), tcp_info("b", &b)]).await;
    send_fds(&master, 2, &[a.as_fd(), b.as_fd()]).await;
    let mut worker = Worker::handshake(worker_end).await.unwrap();
    assert_eq!((worker.generation(), worker.id()), (4, 9));
    let names: Vec<_> = worker.manifest().map(|l| l.name.clone()).collect();
    assert_eq!(names, ["a", "b"]);
    let lb = worker.take("b").unwrap();
    assert!(matches!(
        worker.take("b"),
        Err(WorkerError::AlreadyTaken(_))
    ));
    assert!(matches!(
        worker.take("zz"),
        Err(WorkerError::UnknownListener(_))
    ));
    let client = tokio::net::TcpStream::connect(b.local_addr().unwrap());
    let (accepted, _) = tokio::join!(lb.accept(), client);
    assert!(matches!(accepted.unwrap(), Stream::Tcp(_)));
    assert_eq!(worker.take_all().len(), 1, "only `a` was left");
    worker.ready().await.unwrap();
    assert_eq!(next_status(&master).await, connections(0));
    assert_eq!(next_status(&master).await, WorkerMessage::Ready);
}

#[tokio::test(flavor = "current_thread")]
async fn a_manifest_that_does_not_match_the_descriptors_is_refused() {
    let (master, worker_end) = pair();
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    hello(&master, vec![tcp_info("a", &a), tcp_info("b", &a)]).await;
    send_fds(&master, 2, &[a.as_fd()]).await;
    let err = Worker::handshake(worker_end).await.unwrap_err();
    assert!(
        matches!(
            err,
            WorkerError::CountMismatch {
                expected: 2,
                received: 1
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_descriptor_bound_elsewhere_than_the_manifest_says_is_refused() {
    let (master, worker_end) = pair();
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    hello(&master, vec![tcp_info("a", &a)]).await;
    send_fds(&master, 1, &[b.as_fd()]).await;
    let err = Worker::handshake(worker_end).await.unwrap_err();
    assert!(
        matches!(&err, WorkerError::WrongSocket { name, .. } if name == "a"),
        "{err}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_descriptor_that_is_not_a_listening_socket_is_refused() {
    let (master, worker_end) = pair();
    let bound_only = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let info = ListenerInfo {
        name: "web".into(),
        address: ListenerAddress::Tcp {
            address: bound_only.local_addr().unwrap(),
        },
        quic_tag: None,
    };
    hello(&master, vec![info]).await;
    send_fds(&master, 1, &[bound_only.as_fd()]).await;
    let err = Worker::handshake(worker_end).await.unwrap_err();
    assert!(
        matches!(&err, WorkerError::NotAListener { name } if name == "web"),
        "{err}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_drain_packet_and_the_master_going_away_both_request_a_drain() {
    let (master, worker_end) = pair();
    hello(&master, vec![]).await;
    let worker = Worker::handshake(worker_end).await.unwrap();
    let mut watch = worker.drain_watch();
    assert!(!watch.is_requested());
    send(&master, &MasterMessage::Unknown, &[]).await; // ignored
    send(&master, &MasterMessage::Drain { deadline_ms: 1500 }, &[]).await;
    assert_eq!(
        watch.requested().await,
        DrainReason::Master {
            deadline: Duration::from_millis(1500)
        }
    );

    let (master, worker_end) = pair();
    hello(&master, vec![]).await;
    let worker = Worker::handshake(worker_end).await.unwrap();
    drop(master);
    assert_eq!(
        worker.drain_watch().requested().await,
        DrainReason::MasterGone
    );
}

#[tokio::test(flavor = "current_thread")]
async fn tracked_connections_are_counted_and_reported() {
    let (master, worker_end) = pair();
    hello(&master, vec![]).await;
    let worker = Worker::handshake(worker_end).await.unwrap();
    assert_eq!(next_status(&master).await, connections(0));
    let guard = worker.track();
    assert_eq!(worker.connections(), 1);
    assert_eq!(next_status(&master).await, connections(1));
    let idle = worker.idle();
    drop(guard);
    idle.await;
    assert_eq!(next_status(&master).await, connections(0));
}
