//! QUIC listeners (`kind: udp`, `quic: true`; docs/quic.md): one UDP socket per generation,
//! all bound to the same address in one `SO_REUSEPORT` group that the master alone makes, steered
//! by a classic BPF program ([`baton_sys::reuseport`]): a packet whose destination connection ID
//! starts with a generation's tag reaches that generation's socket; the rest (a client's first
//! packets, unknown tags) reach the newest serving generation's.
//!
//! The kernel numbers a group's sockets in the order they joined, and renumbers when one leaves
//! (the last takes its place). So a group never closes a socket while it lives: a generation's
//! socket, once no generation holds it, waits in the group (its queue emptied) and is handed to
//! the next generation. The numbers never change, the program is only rewritten when the routes
//! do, and no packet is ever hashed to a socket at random.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::rc::Rc;

use baton_proto::ListenerAddress;
use baton_sys::reuseport::{QuicRoutes, attach, quic_program};
use socket2::{Domain, Socket, Type};

use super::BoundSocket;
use crate::config::ListenerConfig;
use crate::listener_options;

/// The sockets of one QUIC address, in the kernel's order.
#[derive(Debug, Default)]
pub struct QuicGroup {
    slots: Vec<Rc<BoundSocket>>,
    /// The routes of the program attached now.
    attached: Option<QuicRoutes>,
}

impl QuicGroup {
    /// A socket for a new generation: one no generation holds any more, its queue emptied, or
    /// a new one that joins the group.
    pub(super) fn socket(&mut self, config: &ListenerConfig) -> io::Result<Rc<BoundSocket>> {
        if let Some(free) = self.slots.iter().find(|s| Rc::strong_count(s) == 1) {
            discard_queued(&free.socket);
            return Ok(free.clone());
        }
        let ListenerAddress::Udp { address } = &config.address else {
            return Err(io::Error::other("a QUIC listener is a UDP socket"));
        };
        let socket = Socket::new(Domain::for_address(*address), Type::DGRAM, None)?;
        socket.set_reuse_port(true)?;
        listener_options::udp_before_bind(&socket, address.is_ipv6(), &config.options)?;
        socket.bind(&(*address).into())?;
        let local = socket
            .local_addr()?
            .as_socket()
            .map_or_else(|| address.to_string(), |a| a.to_string());
        if self.slots.is_empty() {
            // Steered from the start: a socket that joins later gets nothing until a program
            // names it (without a program the kernel would hash among all of them).
            let routes = QuicRoutes {
                tagged: Vec::new(),
                default: 0,
            };
            attach(socket.as_fd(), &quic_program(&routes))?;
            self.attached = Some(routes);
        }
        let bound = Rc::new(BoundSocket {
            address: config.address.clone(),
            local,
            socket,
            unix_file: None,
            stopped: std::cell::Cell::new(false),
            bound_with: Some(config.options.clone()),
        });
        self.slots.push(bound.clone());
        Ok(bound)
    }

    /// The kernel's index of `socket` in this group.
    pub fn index_of(&self, socket: &Rc<BoundSocket>) -> Option<u16> {
        self.slots
            .iter()
            .position(|s| Rc::ptr_eq(s, socket))
            .map(|i| i as u16)
    }

    /// Attaches the program for `routes` unless it is the one attached. Returns whether it did.
    pub fn steer(&mut self, routes: QuicRoutes) -> io::Result<bool> {
        if self.attached.as_ref() == Some(&routes) {
            return Ok(false);
        }
        let Some(any) = self.slots.first() else {
            return Ok(false);
        };
        attach(any.fd(), &quic_program(&routes))?;
        self.attached = Some(routes);
        Ok(true)
    }

    /// No generation holds any of its sockets.
    pub(super) fn idle(&self) -> bool {
        self.slots.iter().all(|s| Rc::strong_count(s) == 1)
    }

    /// Its sockets, in the kernel's order.
    pub fn sockets(&self) -> &[Rc<BoundSocket>] {
        &self.slots
    }
}

/// Reads and drops what waits in a socket no generation holds: datagrams of connections whose
/// generation is gone, which the next generation could not make sense of.
fn discard_queued(socket: &Socket) {
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    // Bounded: at most what a receive buffer holds in small datagrams.
    for _ in 0..100_000 {
        if socket
            .recv_with_flags(&mut buf, nix::libc::MSG_DONTWAIT)
            .is_err()
        {
            return;
        }
    }
}
