//! The handshake state machines of both sides (frames in PROTOCOL.md, "Handshake"):
//!
//! ```text
//! sender                                   receiver
//!   Hello(version, ids, group, epoch, devices, features, nonce_s) ->
//!                                          checks version, receiver id, allow entry
//!                        <- Challenge(features, nonce_r)   | Error
//!   Auth(HMAC(psk, "sender" | T1)) ->      verifies the sender's proof
//!                                          asks the core (group uuid, devices, epoch)
//!      <- Accept(epoch, durable position, features, HMAC(psk, "receiver" | T2)) | Error
//!   verifies the receiver's proof
//! ```
//! T1 hashes Hello and Challenge payloads, T2 also the Auth payload and the Accept fields. Each
//! side proves it holds the key over both nonces, so a recorded handshake cannot be replayed and a
//! proof cannot be reflected (the role is in the MAC).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::{self, Role, Transcript};
use crate::config::{LinkIdentity, Permission, SiteConfig};
use crate::conn::{self, FrameReader};
use crate::counters::Counters;
use crate::error::LinkError;
use crate::frame::{
    payload_of, Accept, Auth, Challenge, ErrorCode, ErrorFrame, Frame, Hello, PROTOCOL_VERSION,
};
use crate::types::Position;

/// Feature bit: the side understands ResyncData / ResyncDone frames. A sender sets it in its
/// Hello when it will send them.
pub const FEATURE_RESYNC: u64 = 1 << 0;
/// Features this build supports. A Hello with any other bit is refused (`Error(Version)`): the
/// sender said it will use something this receiver does not understand.
pub const FEATURES_SUPPORTED: u64 = FEATURE_RESYNC;

/// What the sender learned from a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub peer_epoch: u64,
    pub durable: Position,
    pub features: u64,
}

fn add_frame(t: &mut Transcript, f: &Frame) -> Result<(), LinkError> {
    let bytes = conn::encode(f)?;
    t.add(payload_of(&bytes));
    Ok(())
}

fn refused(e: ErrorFrame, counters: &Counters) -> LinkError {
    if e.code == ErrorCode::AuthFailed {
        Counters::inc(&counters.auth_failures);
    } else {
        Counters::inc(&counters.refusals);
    }
    LinkError::Refused {
        code: e.code,
        message: e.message,
    }
}

fn unexpected(what: &str, got: &Frame) -> LinkError {
    LinkError::Protocol(format!("expected {what}, got {:?}", got.frame_type()))
}

/// Sender side: runs the handshake on a fresh connection.
pub async fn sender<R, W>(
    rd: &mut FrameReader<R>,
    wr: &mut W,
    cfg: &SiteConfig,
    id: &LinkIdentity,
    counters: &Counters,
) -> Result<Accepted, LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut t = Transcript::new();
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        features: id.features,
        group_uuid: id.group_uuid,
        epoch: id.epoch,
        nonce: auth::nonce(),
        sender_site: cfg.site_id.clone(),
        receiver_site: id.receiver_site.clone(),
        devices: id.devices.clone(),
    });
    add_frame(&mut t, &hello)?;
    conn::write_frame(wr, &hello, counters).await?;

    let challenge = match rd.expect_frame().await? {
        Frame::Challenge(c) => Frame::Challenge(c),
        Frame::Error(e) => return Err(refused(e, counters)),
        other => return Err(unexpected("Challenge", &other)),
    };
    add_frame(&mut t, &challenge)?;
    let auth_frame = Frame::Auth(Auth {
        proof: auth::prove(&cfg.psk, Role::Sender, &t.digest()),
    });
    add_frame(&mut t, &auth_frame)?;
    conn::write_frame(wr, &auth_frame, counters).await?;

    let accept = match rd.expect_frame().await? {
        Frame::Accept(a) => a,
        Frame::Error(e) => return Err(refused(e, counters)),
        other => return Err(unexpected("Accept", &other)),
    };
    t.add(&auth::accept_fields(&accept));
    let proof_ok = auth::verify(&cfg.psk, Role::Receiver, &t.digest(), &accept.proof);
    if proof_ok && accept.features & id.features != id.features {
        // The sender offered only what it will use; a receiver that did not accept all of it
        // would fail on the first frame it does not understand.
        let msg = format!(
            "site {} accepted features {:#x} of the {:#x} this sender uses",
            id.receiver_site, accept.features, id.features
        );
        let _ = conn::write_frame(
            wr,
            &Frame::Error(ErrorFrame::new(ErrorCode::Version, msg.clone())),
            counters,
        )
        .await;
        return Err(LinkError::Protocol(msg));
    }
    if !proof_ok {
        Counters::inc(&counters.auth_failures);
        let msg = format!(
            "site {}'s key proof did not verify (it does not hold this group's key)",
            id.receiver_site
        );
        // Best effort: the receiver learns why we hang up.
        let _ = conn::write_frame(
            wr,
            &Frame::Error(ErrorFrame::new(ErrorCode::AuthFailed, msg.clone())),
            counters,
        )
        .await;
        return Err(LinkError::AuthFailed(msg));
    }
    Ok(Accepted {
        peer_epoch: accept.epoch,
        durable: Position {
            lsn: accept.durable_lsn,
            resync_seq: accept.durable_resync_seq,
        },
        features: accept.features,
    })
}

/// Receiver side, first half: a Hello from an allowed site whose key proof verified.
pub struct Authenticated {
    pub hello: Hello,
    pub permission: Permission,
    transcript: Transcript,
}

/// Sends an Error frame (best effort), counts the refusal and returns the matching error.
pub async fn refuse<W: AsyncWrite + Unpin>(
    wr: &mut W,
    code: ErrorCode,
    message: String,
    counters: &Counters,
) -> LinkError {
    if code == ErrorCode::AuthFailed {
        Counters::inc(&counters.auth_failures);
    } else {
        Counters::inc(&counters.refusals);
    }
    let _ = conn::write_frame(
        wr,
        &Frame::Error(ErrorFrame::new(code, message.clone())),
        counters,
    )
    .await;
    LinkError::RefusedPeer { code, message }
}

/// Receiver side: reads the Hello, checks version, receiver id and allow entry, challenges the
/// sender and verifies its proof.
pub async fn receiver_authenticate<R, W>(
    rd: &mut FrameReader<R>,
    wr: &mut W,
    cfg: &SiteConfig,
    counters: &Arc<Counters>,
) -> Result<Authenticated, LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut t = Transcript::new();
    let hello = match rd.expect_frame().await {
        Ok(Frame::Hello(h)) => h,
        Ok(other) => {
            let msg = format!("expected Hello, got {:?}", other.frame_type());
            return Err(refuse(wr, ErrorCode::Protocol, msg, counters).await);
        }
        Err(LinkError::Frame(e)) => {
            let msg = format!("not a slink Hello: {e}");
            return Err(refuse(wr, ErrorCode::Protocol, msg, counters).await);
        }
        Err(e) => return Err(e),
    };
    if hello.version != PROTOCOL_VERSION {
        let msg = format!(
            "protocol version {} not supported (this site speaks {PROTOCOL_VERSION})",
            hello.version
        );
        return Err(refuse(wr, ErrorCode::Version, msg, counters).await);
    }
    let unknown = hello.features & !FEATURES_SUPPORTED;
    if unknown != 0 {
        let msg = format!(
            "site {} will use features {unknown:#x} that site {} does not support (it supports \
             {FEATURES_SUPPORTED:#x}); upgrade the receiving site",
            hello.sender_site, cfg.site_id
        );
        return Err(refuse(wr, ErrorCode::Version, msg, counters).await);
    }
    if hello.receiver_site != cfg.site_id {
        let msg = format!(
            "this is site {}, not site {}",
            cfg.site_id, hello.receiver_site
        );
        return Err(refuse(wr, ErrorCode::WrongSite, msg, counters).await);
    }
    let Some(permission) = cfg.permission_of(&hello.sender_site) else {
        let msg = format!(
            "no allow entry for site {} at site {}",
            hello.sender_site, cfg.site_id
        );
        return Err(refuse(wr, ErrorCode::NotAllowed, msg, counters).await);
    };
    add_frame(&mut t, &Frame::Hello(hello.clone()))?;
    let challenge = Frame::Challenge(Challenge {
        features: FEATURES_SUPPORTED,
        nonce: auth::nonce(),
    });
    add_frame(&mut t, &challenge)?;
    conn::write_frame(wr, &challenge, counters).await?;

    let proof = match rd.expect_frame().await? {
        Frame::Auth(a) => a.proof,
        Frame::Error(e) => return Err(refused(e, counters)),
        other => {
            let msg = format!("expected Auth, got {:?}", other.frame_type());
            return Err(refuse(wr, ErrorCode::Protocol, msg, counters).await);
        }
    };
    if !auth::verify(&cfg.psk, Role::Sender, &t.digest(), &proof) {
        let msg = format!(
            "authentication failed: site {}'s key proof did not verify at site {}",
            hello.sender_site, cfg.site_id
        );
        return Err(refuse(wr, ErrorCode::AuthFailed, msg, counters).await);
    }
    t.add(&proof);
    Ok(Authenticated {
        hello,
        permission,
        transcript: t,
    })
}

/// Receiver side, second half: the core admitted the peer; sends the Accept with our proof.
pub async fn receiver_accept<W: AsyncWrite + Unpin>(
    wr: &mut W,
    cfg: &SiteConfig,
    a: &Authenticated,
    epoch: u64,
    durable: Position,
    counters: &Counters,
) -> Result<u64, LinkError> {
    let features = a.hello.features & FEATURES_SUPPORTED;
    let mut accept = Accept {
        epoch,
        durable_lsn: durable.lsn,
        durable_resync_seq: durable.resync_seq,
        features,
        proof: [0; 32],
    };
    let mut t = a.transcript.clone();
    t.add(&auth::accept_fields(&accept));
    accept.proof = auth::prove(&cfg.psk, Role::Receiver, &t.digest());
    conn::write_frame(wr, &Frame::Accept(accept), counters).await?;
    Ok(features)
}
