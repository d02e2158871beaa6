//! Each transport carries whole frames both ways over a loopback pair, and refuses oversized and
//! cut-off frames with an error that says so.

use super::*;
use crate::proto::MAX_WIRE_FRAME;
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::tungstenite::Message;
use async_tungstenite::WebSocketStream;
use smol::io::AsyncWriteExt;
use smol::net::{TcpListener, TcpStream};

/// Two ends of a loopback TCP connection.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (a, b) = smol::future::zip(TcpStream::connect(addr), l.accept()).await;
    (a.unwrap(), b.unwrap().0)
}

/// Two ends of a WebSocket over loopback TCP: a client with `client` limits, a server with ours.
async fn ws_pair(client: WebSocketConfig) -> (WebSocketStream<BoxIo>, WebSocketStream<BoxIo>) {
    let (a, b) = tcp_pair().await;
    let (a, b): (BoxIo, BoxIo) = (Box::pin(a), Box::pin(b));
    let client = WebSocketStream::from_raw_socket(a, Role::Client, Some(client));
    let server = WebSocketStream::from_raw_socket(b, Role::Server, Some(websocket::config()));
    smol::future::zip(client, server).await
}

/// A frame with room for the transport's header in front.
fn framed(frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0xee; HEADROOM];
    v.extend_from_slice(frame);
    v
}

/// Frames of these sizes, each with distinct contents.
fn frames() -> Vec<Vec<u8>> {
    [0, 1, 100, 40_000, 40_000, 3, MAX_WIRE_FRAME]
        .iter()
        .enumerate()
        .map(|(i, &n)| vec![i as u8 + 1; n])
        .collect()
}

/// Send every frame of [`frames`] one way and check each arrives whole, then a clean close.
async fn round_trip(mut tx: impl FrameSend, mut rx: impl FrameRecv) {
    let sent = frames();
    let sender = async {
        for f in &sent {
            tx.send(&mut framed(f)).await.unwrap();
        }
        tx.close().await;
    };
    let receiver = async {
        for f in &sent {
            let got = rx.recv(MAX_WIRE_FRAME).await.unwrap().expect("a frame, not a close");
            assert_eq!(got.len(), f.len());
            assert!(got == &f[..], "frame of {} bytes altered", f.len());
        }
        assert!(rx.recv(MAX_WIRE_FRAME).await.unwrap().is_none(), "a clean close after the frames");
    };
    smol::future::zip(sender, receiver).await;
}

#[test]
fn tcp_carries_whole_frames_both_ways_and_ends_cleanly() {
    smol::block_on(async {
        let (a, b) = tcp_pair().await;
        let ((ra, wa), (rb, wb)) = (tcp::Tcp(Box::pin(a)).split(), tcp::split(Box::pin(b)));
        round_trip(wa, rb).await;
        round_trip(wb, ra).await;
    })
}

#[test]
fn tcp_reads_several_frames_that_came_in_one_write() {
    smol::block_on(async {
        let (mut a, b) = tcp_pair().await;
        let mut bytes = Vec::new();
        for f in [&b"one"[..], b"two!", b""] {
            bytes.extend_from_slice(&(f.len() as u32).to_be_bytes());
            bytes.extend_from_slice(f);
        }
        a.write_all(&bytes).await.unwrap();
        let (mut rx, _tx) = tcp::split(Box::pin(b));
        assert_eq!(rx.recv(100).await.unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(rx.recv(100).await.unwrap().as_deref(), Some(&b"two!"[..]));
        assert_eq!(rx.recv(100).await.unwrap().as_deref(), Some(&b""[..]));
    })
}

#[test]
fn tcp_refuses_a_length_over_the_limit_before_reading_the_frame() {
    smol::block_on(async {
        let (mut a, b) = tcp_pair().await;
        let (mut rx, _tx) = tcp::split(Box::pin(b));
        // One byte over the caller's limit; the frame itself never comes.
        a.write_all(&101u32.to_be_bytes()).await.unwrap();
        let e = rx.recv(100).await.expect_err("a frame over the limit");
        assert!(matches!(e, TransportError::Protocol(_)), "{e:?}");
        assert!(e.to_string().contains("length prefix 101 is over the 100-byte frame limit"), "{e}");
        // The limit can never exceed what the buffer holds.
        let (mut a, b) = tcp_pair().await;
        let (mut rx, _tx) = tcp::split(Box::pin(b));
        a.write_all(&(MAX_WIRE_FRAME as u32 + 1).to_be_bytes()).await.unwrap();
        let e = rx.recv(usize::MAX).await.expect_err("a frame over the largest wire frame");
        assert!(e.to_string().contains(&format!("over the {MAX_WIRE_FRAME}-byte frame limit")), "{e}");
    })
}

#[test]
fn tcp_frame_cut_off_by_the_peer_is_an_error_not_a_clean_close() {
    smol::block_on(async {
        // The stream ends inside the frame...
        let (mut a, b) = tcp_pair().await;
        a.write_all(&100u32.to_be_bytes()).await.unwrap();
        a.write_all(&[7; 10]).await.unwrap();
        drop(a);
        let (mut rx, _tx) = tcp::split(Box::pin(b));
        let e = rx.recv(MAX_WIRE_FRAME).await.expect_err("a truncated frame");
        assert!(matches!(&e, TransportError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof), "{e:?}");
        assert!(e.to_string().contains("ended in the middle of a frame"), "{e}");
        // ... right after its length ...
        let (mut a, b) = tcp_pair().await;
        a.write_all(&5u32.to_be_bytes()).await.unwrap();
        drop(a);
        let (mut rx, _tx) = tcp::split(Box::pin(b));
        assert!(matches!(rx.recv(MAX_WIRE_FRAME).await, Err(TransportError::Io(_))));
        // ... or inside the length itself.
        let (mut a, b) = tcp_pair().await;
        a.write_all(&[0, 0]).await.unwrap();
        drop(a);
        let (mut rx, _tx) = tcp::split(Box::pin(b));
        assert!(matches!(rx.recv(MAX_WIRE_FRAME).await, Err(TransportError::Io(_))));
    })
}

#[test]
fn websocket_carries_whole_frames_both_ways_and_ends_cleanly() {
    smol::block_on(async {
        let (a, b) = ws_pair(websocket::config()).await;
        let ((mut ra, wa), (rb, mut wb)) = (Transport::split(a), websocket::split(b));
        // A close ends both directions: the server's frames first, then the client's and its close.
        for f in &frames() {
            let (r, s) = smol::future::zip(ra.recv(MAX_WIRE_FRAME), wb.send(&mut framed(f))).await;
            s.unwrap();
            assert!(r.unwrap().expect("a frame") == &f[..], "frame of {} bytes altered", f.len());
        }
        round_trip(wa, rb).await;
    })
}

#[test]
fn websocket_refuses_an_oversized_message() {
    smol::block_on(async {
        // A peer that ignores the limits sends one byte more than the largest wire frame.
        let (mut a, b) = ws_pair(WebSocketConfig::default()).await;
        let (mut rx, _tx) = websocket::split(b);
        let big = vec![1u8; MAX_WIRE_FRAME + 1];
        let (_, got) = smol::future::zip(a.send(Message::Binary(big.into())), rx.recv(MAX_WIRE_FRAME)).await;
        let e = got.expect_err("a message over the limit");
        assert!(matches!(e, TransportError::WebSocket(_)), "{e:?}");
        assert!(e.to_string().contains("Message too long"), "{e}");

        // Below tungstenite's limit, the caller's own limit holds (before the handshake it is
        // `MAX_FRAME`, without room for a tag).
        let (mut a, b) = ws_pair(websocket::config()).await;
        let (mut rx, _tx) = websocket::split(b);
        a.send(Message::Binary(vec![1u8; 101].into())).await.unwrap();
        let e = rx.recv(100).await.expect_err("a message over the caller's limit");
        assert!(e.to_string().contains("a 101-byte message is over the 100-byte frame limit"), "{e}");

        // Text is never a frame.
        let (mut a, b) = ws_pair(websocket::config()).await;
        let (mut rx, _tx) = websocket::split(b);
        a.send(Message::Text("hello".into())).await.unwrap();
        let e = rx.recv(100).await.expect_err("a text message");
        assert!(e.to_string().contains("text message"), "{e}");
    })
}

#[test]
fn websocket_peer_gone_without_a_close_is_an_error_not_a_clean_close() {
    smol::block_on(async {
        let (a, b) = tcp_pair().await;
        let (a, b): (BoxIo, BoxIo) = (Box::pin(a), Box::pin(b));
        let server = WebSocketStream::from_raw_socket(b, Role::Server, Some(websocket::config())).await;
        let (mut rx, _tx) = websocket::split(server);
        let mut a = a;
        // Half a WebSocket frame header, then the connection ends without a close frame.
        a.write_all(&[0x82]).await.unwrap();
        drop(a);
        let got = rx.recv(MAX_WIRE_FRAME).await;
        assert!(got.is_err(), "{got:?}");
    })
}
