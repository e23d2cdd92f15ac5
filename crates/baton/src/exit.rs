//! The exit statuses of `baton`'s commands, written once (the sysexits.h names;
//! [docs/cli.md](../../../docs/cli.md) says what each means to an operator). 0 is success; a
//! master's own status (`baton run`) is the one its state machine chose.

/// Bad arguments or configuration. With `RestartPreventExitStatus=64`, systemd does not
/// restart-loop on a broken configuration.
pub(crate) const EX_USAGE: u8 = 64;
/// No master answers at the control socket.
pub(crate) const EX_UNAVAILABLE: u8 = 69;
/// Reading or writing failed (the connection to the master broke, stdout could not be written).
pub(crate) const EX_IOERR: u8 = 74;
/// The master answered in a way this baton does not understand (another version).
pub(crate) const EX_PROTOCOL: u8 = 76;
/// The control socket refused this user.
pub(crate) const EX_NOPERM: u8 = 77;
