//! The handoff exchange with real sockets: a real worker on one end of a link, the test on the
//! other playing the peer that fails (or the master that introduces them). Each case ends with
//! the client's connection served by exactly one side, which the client checks by talking.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use baton_proto::handoff::{ConnectionKind, LinkMessage, MAX_BATCH, Offered};
use baton_proto::{
    HandoffLink, HandoffRole, Hello, MAX_MESSAGE_SIZE, MasterMessage, PROTOCOL_VERSION,
};
use baton_sys::channel;
use tokio::net::UnixDatagram;

use super::{Handoff, KeptBecause};
use crate::Worker;

fn pair() -> (UnixDatagram, UnixDatagram) {
    let (a, b) = channel::pair().unwrap();
    (
        channel::into_async(a).unwrap(),
        channel::into_async(b).unwrap(),
    )
}

/// A link: the end for the worker under test, and the test's end.
fn link() -> (OwnedFd, UnixDatagram) {
    let (a, b) = channel::pair().unwrap();
    (a, channel::into_async(b).unwrap())
}

/// A worker with no listeners, its master's end, and its part in handoff.
/// A taker with a link from a giver: the master's end, the worker, its handoff and the
/// giver's end of the link.
async fn a_taker_linked() -> (UnixDatagram, Worker, Handoff, UnixDatagram) {
    let (master, w, taker) = worker().await;
    let (t, g) = link();
    introduce(&master, HandoffRole::Taker, t).await;
    (master, w, taker, g)
}

/// A giver with a link to a taker the test plays, its offers at most `max_per_second` a second
/// (0: no limit), once the link is open: the master's end, the worker, its handoff and the
/// taker's end of the link.
async fn a_giver_linked(max_per_second: u32) -> (UnixDatagram, Worker, Handoff, UnixDatagram) {
    let (master, w, giver) = worker().await;
    let (g, t) = link();
    introduce_paced(&master, HandoffRole::Giver, g, max_per_second).await;
    until_takers(&giver, 1).await;
    (master, w, giver, t)
}

async fn worker() -> (UnixDatagram, Worker, Handoff) {
    let (master, end) = pair();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        watchdog_ms: None,
        generation: 1,
        worker_id: 1,
        listeners: vec![],
    };
    let packet = baton_proto::encode(&MasterMessage::Hello(hello));
    channel::send_with_fds(&master, &packet, &[]).await.unwrap();
    let worker = Worker::handshake(end).await.unwrap();
    let handoff = worker.handoff(true, true).await.unwrap();
    (master, worker, handoff)
}

/// The master hands `worker` its end of a link, as giver or taker.
async fn introduce(master: &UnixDatagram, role: HandoffRole, end: OwnedFd) {
    introduce_paced(master, role, end, 0).await;
}

/// [`introduce`], the link's offers at most `max_per_second` a second (0: no limit).
async fn introduce_paced(
    master: &UnixDatagram,
    role: HandoffRole,
    end: OwnedFd,
    max_per_second: u32,
) {
    let link = MasterMessage::HandoffLink(HandoffLink {
        link: 1,
        role,
        peer: 2,
        peer_generation: 2,
        deadline_ms: 30_000,
        max_per_second,
    });
    let packet = baton_proto::encode(&link);
    channel::send_with_fds(master, &packet, &[end.as_fd()])
        .await
        .unwrap();
}

/// A client connected to a server socket: (client, server side).
fn connection() -> (std::net::TcpStream, OwnedFd) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server.into())
}

/// The server side of a connection answers the client: proof of who holds it.
fn answer(server: OwnedFd, client: &mut std::net::TcpStream, word: &[u8]) {
    let mut server = std::net::TcpStream::from(server);
    server.write_all(word).unwrap();
    let mut got = vec![0u8; word.len()];
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, word);
}

/// The next link packet, with its descriptors; a taker's `takes_batches` is passed over (the
/// test, as giver, sends single offers unless it says otherwise).
async fn next(link: &UnixDatagram) -> (LinkMessage, Vec<OwnedFd>) {
    loop {
        let packet = next_packet(link).await;
        if !matches!(packet.0, LinkMessage::TakesBatches { .. }) {
            return packet;
        }
    }
}

/// The next link packet, whatever it is.
async fn next_packet(link: &UnixDatagram) -> (LinkMessage, Vec<OwnedFd>) {
    let mut buf = vec![0u8; MAX_MESSAGE_SIZE];
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        channel::recv_with_fds(link, &mut buf, MAX_BATCH),
    )
    .await
    .expect("a packet within 10 s")
    .unwrap();
    assert!(got.len > 0, "the link ended");
    (baton_proto::decode(&buf[..got.len]).unwrap(), got.fds)
}

async fn send(link: &UnixDatagram, message: &LinkMessage, fds: &[std::os::fd::BorrowedFd<'_>]) {
    channel::send_with_fds(link, &baton_proto::encode(message), fds)
        .await
        .unwrap();
}

/// Waits (bounded) until the giver's links are open: the master's packet was read.
async fn until_takers(handoff: &Handoff, n: usize) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while handoff.takers() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the link to arrive");
}

#[tokio::test(flavor = "current_thread")]
async fn two_workers_hand_a_connection_over_and_the_taker_answers_on_it() {
    let (giver_master, _giver_worker, giver) = worker().await;
    let (taker_master, _taker_worker, taker) = worker().await;
    let (g, t) = channel::pair().unwrap();
    introduce(&giver_master, HandoffRole::Giver, g).await;
    introduce(&taker_master, HandoffRole::Taker, t).await;
    until_takers(&giver, 1).await;
    let (mut client, server) = connection();
    giver
        .offer(server, ConnectionKind::Http1, b"GET /next".to_vec())
        .await
        .unwrap();
    let adopted = tokio::time::timeout(Duration::from_secs(5), taker.adopted())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(adopted.kind, ConnectionKind::Http1);
    assert_eq!(adopted.state, b"GET /next");
    answer(adopted.socket, &mut client, b"from the taker");
    let counts = giver.counts();
    assert_eq!((counts.offered, counts.adopted, counts.kept), (1, 1, 0));
}

/// A link's `max_per_second` spaces a giver's offers evenly, however fast the taker answers:
/// 6 offers at 20 a second take at least 5 gaps of 50 ms, and every one is adopted.
#[tokio::test(flavor = "current_thread")]
async fn offers_on_a_paced_link_are_evenly_spaced() {
    let (giver_master, _giver_worker, giver) = worker().await;
    let (taker_master, _taker_worker, taker) = worker().await;
    let (g, t) = channel::pair().unwrap();
    introduce_paced(&giver_master, HandoffRole::Giver, g, 20).await;
    introduce(&taker_master, HandoffRole::Taker, t).await;
    until_takers(&giver, 1).await;
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    for _ in 0..6 {
        let (client, server) = connection();
        giver
            .offer(server, ConnectionKind::Http1, Vec::new())
            .await
            .unwrap();
        clients.push(client);
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "6 offers at 20 a second went in {took:?}"
    );
    for client in &mut clients {
        let adopted = tokio::time::timeout(Duration::from_secs(5), taker.adopted())
            .await
            .unwrap()
            .unwrap();
        answer(adopted.socket, client, b"paced");
    }
}

/// A giver with one link, whose other end `taker` plays: the connection offered, what became
/// of the offer (kept, here), the giver's part, and the client.
async fn offer_to_a_failing_taker<F, Fut>(taker: F) -> (super::Kept, Handoff, std::net::TcpStream)
where
    F: FnOnce(UnixDatagram) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (_master, _worker, giver, t) = a_giver_linked(0).await;
    let (client, server) = connection();
    let offering = giver.offer(server, ConnectionKind::Http1, Vec::new());
    let (kept, ()) = tokio::join!(offering, taker(t));
    (kept.unwrap_err(), giver, client)
}

/// The id of the offer that comes next on the link (its copy of the connection dropped).
async fn offered(t: &UnixDatagram) -> u64 {
    match next(t).await {
        (LinkMessage::Offer { id, .. }, fds) if fds.len() == 1 => id,
        other => panic!("not an offer with its descriptor: {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_taker_that_goes_before_preparing_leaves_the_connection_with_the_giver() {
    // The taker dies: its copy and its end of the link close.
    let (kept, giver, mut client) = offer_to_a_failing_taker(|t| async move {
        offered(&t).await;
    })
    .await;
    assert!(matches!(kept.why, KeptBecause::TakerGone), "{}", kept.why);
    answer(kept.socket, &mut client, b"still the giver");
    assert_eq!(giver.counts().kept, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_refusal_leaves_the_connection_with_the_giver() {
    let (kept, _, mut client) = offer_to_a_failing_taker(|t| async move {
        let id = offered(&t).await;
        let reason = "full".to_string();
        send(&t, &LinkMessage::Refused { id, reason }, &[]).await;
    })
    .await;
    assert!(matches!(kept.why, KeptBecause::Refused(ref r) if r == "full"));
    answer(kept.socket, &mut client, b"still the giver");
}

#[tokio::test(flavor = "current_thread")]
async fn a_taker_that_does_not_prepare_in_time_is_told_to_abort() {
    let (kept, _, mut client) = offer_to_a_failing_taker(|t| async move {
        let id = offered(&t).await;
        // No answer: the giver gives up after OFFER_TIMEOUT and says so, on the link.
        assert_eq!(next(&t).await.0, LinkMessage::Abort { id });
    })
    .await;
    assert!(matches!(kept.why, KeptBecause::TimedOut), "{}", kept.why);
    answer(kept.socket, &mut client, b"still the giver");
}

#[tokio::test(flavor = "current_thread")]
async fn a_giver_that_goes_after_the_taker_prepared_leaves_the_connection_to_the_taker() {
    let (_master, _w, taker, g) = a_taker_linked().await;
    let (mut client, server) = connection();
    let offer = LinkMessage::Offer {
        id: 5,
        kind: ConnectionKind::Http1,
        state: b"abc".to_vec(),
    };
    send(&g, &offer, &[server.as_fd()]).await;
    let (prepared, _) = next(&g).await;
    assert_eq!(prepared, LinkMessage::Prepared { id: 5 });
    // The giver dies before its commit: it served nothing since the offer.
    drop(server);
    drop(g);
    let adopted = tokio::time::timeout(Duration::from_secs(5), taker.adopted())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(adopted.state, b"abc");
    answer(adopted.socket, &mut client, b"the taker serves");
}

/// A giver dies with offers in flight and the taker's answers unread: the kernel resets the
/// link, and says so before the offers still queued. The taker reads on and serves every one
/// (none was committed, aborted or served by the giver since). Issue 30's fault test found it:
/// the taker stopped at the reset, and the offer in flight died with the link.
#[tokio::test(flavor = "current_thread")]
async fn a_giver_dying_with_answers_unread_leaves_every_offer_in_flight_to_the_taker() {
    let (_master, _w, taker, g) = a_taker_linked().await;
    let (mut first_client, first) = connection();
    let (mut second_client, second) = connection();
    let offer = |id| LinkMessage::Offer {
        id,
        kind: ConnectionKind::Http1,
        state: vec![id as u8],
    };
    send(&g, &offer(1), &[first.as_fd()]).await;
    // The taker's answer to the first is left unread; the second goes after it.
    tokio::time::timeout(Duration::from_secs(5), g.readable())
        .await
        .expect("the taker's answer")
        .unwrap();
    send(&g, &offer(2), &[second.as_fd()]).await;
    drop((first, second));
    drop(g);
    let mut adopted = Vec::new();
    for _ in 0..2 {
        let a = tokio::time::timeout(Duration::from_secs(5), taker.adopted())
            .await
            .expect("each offer in flight adopted")
            .unwrap();
        adopted.push(a);
    }
    adopted.sort_by_key(|a| a.state.clone());
    let mut adopted = adopted.into_iter();
    answer(adopted.next().unwrap().socket, &mut first_client, b"one");
    answer(adopted.next().unwrap().socket, &mut second_client, b"two");
}

#[tokio::test(flavor = "current_thread")]
async fn an_aborted_offer_is_never_served_by_the_taker_even_when_the_giver_goes() {
    let (_master, _w, taker, g) = a_taker_linked().await;
    let (mut client, server) = connection();
    let offer = |id| LinkMessage::Offer {
        id,
        kind: ConnectionKind::Http1,
        state: Vec::new(),
    };
    send(&g, &offer(1), &[server.as_fd()]).await;
    assert_eq!(next(&g).await.0, LinkMessage::Prepared { id: 1 });
    send(&g, &LinkMessage::Abort { id: 1 }, &[]).await;
    // A second offer, refused: not one descriptor with it.
    send(&g, &offer(2), &[]).await;
    assert!(matches!(
        next(&g).await.0,
        LinkMessage::Refused { id: 2, .. }
    ));
    drop(g);
    let nothing = tokio::time::timeout(Duration::from_millis(300), taker.adopted()).await;
    assert!(nothing.is_err(), "adopted an aborted offer: {nothing:?}");
    answer(server, &mut client, b"the giver serves on");
}

/// A taker whose application does not take its adopted connections answers no more offers
/// once `ADOPTED_WAITING` wait for it: the giver's next offer is answered only when the
/// application takes one (the giver slows down instead of filling a queue nobody serves).
#[tokio::test(flavor = "current_thread")]
async fn a_taker_whose_application_lags_answers_the_next_offer_only_when_it_takes_one() {
    let (_master, _w, taker, g) = a_taker_linked().await;
    let offer = |id| LinkMessage::Offer {
        id,
        kind: ConnectionKind::Http1,
        state: Vec::new(),
    };
    let mut clients = Vec::new();
    for id in 1..=super::ADOPTED_WAITING as u64 {
        let (client, server) = connection();
        send(&g, &offer(id), &[server.as_fd()]).await;
        assert_eq!(next(&g).await.0, LinkMessage::Prepared { id });
        send(&g, &LinkMessage::Commit { id }, &[]).await;
        clients.push(client);
    }
    let last = super::ADOPTED_WAITING as u64 + 1;
    let (mut client, server) = connection();
    send(&g, &offer(last), &[server.as_fd()]).await;
    drop(server);
    let early = tokio::time::timeout(Duration::from_millis(300), next(&g)).await;
    assert!(early.is_err(), "answered with the queue full: {early:?}");
    // The application takes the first: the offer is answered, and the connection adopted.
    let first = taker.adopted().await.unwrap();
    answer(first.socket, &mut clients[0], b"first");
    let (reply, _) = tokio::time::timeout(Duration::from_secs(5), next(&g))
        .await
        .expect("the answer once there is room");
    assert_eq!(reply, LinkMessage::Prepared { id: last });
    send(&g, &LinkMessage::Commit { id: last }, &[]).await;
    for _ in 1..super::ADOPTED_WAITING {
        taker.adopted().await.unwrap();
    }
    let adopted = tokio::time::timeout(Duration::from_secs(5), taker.adopted())
        .await
        .unwrap()
        .unwrap();
    answer(adopted.socket, &mut client, b"last");
}

/// A giver has at most `IN_FLIGHT` offers waiting for an answer on a link: the next turn
/// comes only when one of them is decided (the connection meanwhile serves on).
#[tokio::test(flavor = "current_thread")]
async fn a_giver_s_next_turn_waits_while_its_offers_in_flight_fill_the_link() {
    let (_master, _worker, giver, _t) = a_giver_linked(0).await;
    let mut turns = Vec::new();
    for _ in 0..super::giver::IN_FLIGHT {
        turns.push(giver.turn().await.expect("a turn"));
    }
    let waiting = tokio::time::timeout(Duration::from_millis(300), giver.turn()).await;
    assert!(waiting.is_err(), "a turn past the limit: {waiting:?}");
    turns.pop();
    let next = tokio::time::timeout(Duration::from_secs(5), giver.turn()).await;
    assert!(matches!(next, Ok(Some(_))), "{next:?}");
}

/// A taker says first that it takes batches, and answers an `offers` packet with one `answers`:
/// each connection prepared or refused (here, one whose descriptor is a listening socket), the
/// prepared ones served once `commits` names them.
#[tokio::test(flavor = "current_thread")]
async fn a_taker_says_it_takes_batches_and_answers_a_batch_in_one_packet() {
    let (_master, _worker, taker, g) = a_taker_linked().await;
    assert_eq!(
        next_packet(&g).await.0,
        LinkMessage::TakesBatches { most: MAX_BATCH }
    );
    let (mut one, one_server) = connection();
    let (mut two, two_server) = connection();
    let listening: OwnedFd = std::net::TcpListener::bind("127.0.0.1:0").unwrap().into();
    let offer = |id: u64, state: &[u8]| Offered {
        id,
        kind: ConnectionKind::Http1,
        state: state.to_vec(),
    };
    let batch = LinkMessage::Offers {
        offers: vec![offer(1, b"GET /1"), offer(2, b"GET /2"), offer(3, b"")],
    };
    send(
        &g,
        &batch,
        &[one_server.as_fd(), two_server.as_fd(), listening.as_fd()],
    )
    .await;
    match next(&g).await.0 {
        LinkMessage::Answers { prepared, refused } => {
            assert_eq!(prepared, vec![1, 2]);
            assert_eq!(refused.len(), 1, "{refused:?}");
            assert_eq!(refused[0].id, 3);
            assert!(
                refused[0].reason.contains("connected stream"),
                "{refused:?}"
            );
        }
        other => panic!("not one answer to the batch: {other:?}"),
    }
    drop((one_server, two_server));
    send(&g, &LinkMessage::Commits { ids: vec![1, 2] }, &[]).await;
    for (client, state) in [(&mut one, b"GET /1"), (&mut two, b"GET /2")] {
        let adopted = tokio::time::timeout(Duration::from_secs(5), taker.adopted())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&adopted.state, state);
        answer(adopted.socket, client, b"from the taker");
    }
}

/// A giver whose taker takes batches sends the offers queued together in `offers` packets (one,
/// unless this thread is held up for longer than the gathering window), and commits what was
/// prepared in one `commits`; a taker that takes no batch gets single `offer`s (the tests above).
#[tokio::test(flavor = "current_thread")]
async fn a_giver_gathers_offers_for_a_taker_that_takes_batches() {
    let (_master, _worker, giver, t) = a_giver_linked(0).await;
    send(&t, &LinkMessage::TakesBatches { most: MAX_BATCH }, &[]).await;
    const N: usize = 5;
    let (clients, servers): (Vec<_>, Vec<_>) = (0..N).map(|_| connection()).unzip();
    let mut offers = tokio::task::JoinSet::new();
    for server in servers {
        let giver = giver.clone();
        offers.spawn(async move {
            giver
                .offer(server, ConnectionKind::Http1, b"state".to_vec())
                .await
        });
    }
    let taker = async {
        let (mut packets, mut ids, mut sockets) = (0, Vec::new(), Vec::new());
        while ids.len() < N {
            match next(&t).await {
                (LinkMessage::Offers { offers }, fds) => {
                    assert_eq!(offers.len(), fds.len(), "one descriptor per offer");
                    assert!(offers.iter().all(|o| o.state == b"state"));
                    ids.extend(offers.iter().map(|o| o.id));
                    sockets.extend(fds);
                    packets += 1;
                }
                other => panic!("not an `offers` packet: {other:?}"),
            }
        }
        assert!(packets < N, "{N} offers came in {packets} packets");
        let answers = LinkMessage::Answers {
            prepared: ids.clone(),
            refused: Vec::new(),
        };
        send(&t, &answers, &[]).await;
        match next(&t).await.0 {
            LinkMessage::Commits { ids: committed } => assert_eq!(committed, ids),
            other => panic!("not one commit for the batch: {other:?}"),
        }
        sockets
    };
    let (offered, sockets) = tokio::join!(offers.join_all(), taker);
    assert!(offered.iter().all(Result::is_ok), "every offer taken");
    // The taker's copies are the connections now: each client hears from one of them.
    for (socket, mut client) in sockets.into_iter().zip(clients) {
        answer(socket, &mut client, b"batched");
    }
    let counts = giver.counts();
    assert_eq!((counts.offered, counts.adopted, counts.kept), (5, 5, 0));
}

/// Tickets: no turn before the drain; then one turn per ticket, in the order they were taken,
/// at the link's pace (a connection gone since it took its ticket is passed over); a ticket
/// taken after the drain (a connection adopted late) gets its turn too.
#[tokio::test(flavor = "current_thread")]
async fn tickets_get_their_turns_in_line_and_only_once_the_worker_drains() {
    let (master, _worker, giver, _t) = a_giver_linked(20).await;
    let mut first = giver.ticket();
    let gone = giver.ticket();
    let mut third = giver.ticket();
    let no_turn_yet = tokio::time::timeout(Duration::from_millis(200), first.turn()).await;
    assert!(no_turn_yet.is_err(), "a turn came before the drain");
    drop(gone);
    let drain = MasterMessage::Drain {
        deadline_ms: 30_000,
    };
    channel::send_with_fds(&master, &baton_proto::encode(&drain), &[])
        .await
        .unwrap();
    let within = |f| tokio::time::timeout(Duration::from_secs(5), f);
    let started = std::time::Instant::now();
    let mut turns = vec![within(third.turn()).await.expect("the third's turn")];
    // In line: the first ticket's turn came before the third's, so it is there already.
    let first_turn = tokio::time::timeout(Duration::from_millis(1), first.turn()).await;
    turns.push(first_turn.expect("the first ticket's turn came before the third's"));
    let mut late = giver.ticket();
    turns.push(within(late.turn()).await.expect("a late ticket's turn"));
    assert!(
        turns.iter().all(Option::is_some),
        "every ticket had a taker"
    );
    // Three turns at 20 a second: at least two gaps of 50 ms (the gone ticket took none).
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(100),
        "three turns at 20 a second in {took:?}"
    );
}

/// A taker that floods its link (here with `takes_batches`, for up to 10 s) does not stall its
/// giver: the link's task still sends the offer and keeps it when no answer comes in time
/// (2 s), long before the flood would end.
#[tokio::test(flavor = "current_thread")]
async fn a_taker_flooding_its_link_does_not_stall_the_giver_s_decisions() {
    let (_master, _worker, giver, t) = a_giver_linked(0).await;
    let flood = tokio::spawn(async move {
        let packet = baton_proto::encode(&LinkMessage::TakesBatches { most: MAX_BATCH });
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < until {
            if channel::send_with_fds(&t, &packet, &[]).await.is_err() {
                break;
            }
            // This thread also runs the offering task.
            tokio::task::yield_now().await;
        }
    });
    let (mut client, server) = connection();
    let started = std::time::Instant::now();
    let kept = giver
        .offer(server, ConnectionKind::Http1, Vec::new())
        .await
        .unwrap_err();
    let took = started.elapsed();
    flood.abort();
    assert!(matches!(kept.why, KeptBecause::TimedOut), "{}", kept.why);
    assert!(
        took < Duration::from_secs(8),
        "the offer was decided only after {took:?}: the flood held the link's task"
    );
    answer(kept.socket, &mut client, b"still the giver");
}
