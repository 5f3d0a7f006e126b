//! The HTTP/2 front of the unix socket: it rewrites a request's `:authority` that the h2
//! crate would refuse, so that every mainstream gRPC client can talk to the server.
//!
//! On a unix socket the authority names nothing; clients fill it in as they please. gRPC's
//! C core (Python, C++, Ruby, PHP, C#) sends the percent-encoded socket path
//! (`tmp%2Fkiln.sock`), grpc-java and grpc-swift the literal path (`/tmp/kiln.sock`),
//! tonic and Go whatever the URI says. h2, under tonic, parses the value as a URI
//! authority and resets the stream with PROTOCOL_ERROR when it is not one
//! (hyperium/h2#487), before any kiln code runs.
//!
//! Why a front rather than another fix: h2 has no option to relax that check, and the
//! client side cannot be changed. So each accepted connection is wrapped in a stream that
//! understands just enough HTTP/2 on its read side: the client's frames are cut one by
//! one, every header block (HEADERS plus its CONTINUATIONs) is decoded with the client's
//! HPACK table, an `:authority` that is not a valid URI authority becomes `localhost`, and
//! the block is handed on as HPACK literals without indexing (so the server's table is
//! never used and needs to stay in step with nothing). Every other frame passes unchanged,
//! and writes go straight to the socket, so streaming (Watch, bidirectional Exec) and flow
//! control are h2's own. The rewriting runs inside h2's own reads, on its task: no relay
//! task, no extra hop (benches/front.rs measures the round trip against h2 alone). The
//! peer-credential check happens on the accepted socket, before the wrapper.
//!
//! Bounds: a header block may take [`MAX_HEADER_BLOCK`] bytes on the wire and decode to
//! [`MAX_HEADER_LIST`] bytes (counted as HTTP/2 counts a header list); a connection that
//! exceeds either, or sends a block HPACK cannot decode, is closed.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// The connection preface every HTTP/2 client sends first (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD_LEN: usize = 9;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The frame size every HTTP/2 endpoint accepts; rewritten blocks are cut to it.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// HPACK table size the server allows the client's encoder (HTTP/2's default, which the
/// server does not change).
const HPACK_TABLE_SIZE: usize = 4096;
/// Largest header block read from the wire, over all its frames.
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// Largest decoded header list: the sum over fields of name + value + 32 octets.
pub const MAX_HEADER_LIST: usize = 256 * 1024;
/// What an unusable `:authority` becomes.
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// A client connection as the HTTP/2 server should read it: header blocks rewritten as
/// the module doc says, everything else as the client sent it.
pub struct NormalisedStream {
    socket: UnixStream,
    front: Front,
    /// Bytes read from the socket that the front has not taken yet.
    input: Vec<u8>,
    /// Bytes the front produced that the server has not read yet, from `output_read`.
    output: Vec<u8>,
    output_read: usize,
    socket_eof: bool,
}

/// Wraps an accepted client connection; see [`NormalisedStream`].
pub fn normalise_authority(socket: UnixStream) -> NormalisedStream {
    NormalisedStream {
        socket,
        front: Front::new(),
        input: Vec::new(),
        output: Vec::new(),
        output_read: 0,
        socket_eof: false,
    }
}

impl AsyncRead for NormalisedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.output_read < this.output.len() {
                let pending = &this.output[this.output_read..];
                let n = pending.len().min(buf.remaining());
                buf.put_slice(&pending[..n]);
                this.output_read += n;
                if this.output_read == this.output.len() {
                    this.output.clear();
                    this.output_read = 0;
                }
                return Poll::Ready(Ok(()));
            }
            // A frame payload passed verbatim goes from the socket to the reader directly.
            let verbatim = this.front.verbatim_remaining();
            if verbatim > 0 && this.input.is_empty() && !this.socket_eof {
                let limit = buf.remaining().min(verbatim);
                let mut direct = buf.take(limit);
                ready!(Pin::new(&mut this.socket).poll_read(cx, &mut direct))?;
                let n = direct.filled().len();
                if n == 0 {
                    this.socket_eof = true;
                    continue;
                }
                // SAFETY: poll_read initialised and filled the first `n` bytes of the
                // unfilled part of `buf` through `direct`, which borrows exactly that part.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                this.front.passed_verbatim(n);
                return Poll::Ready(Ok(()));
            }
            this.front.feed(&mut this.input, &mut this.output)?;
            if !this.output.is_empty() {
                continue;
            }
            if this.socket_eof {
                if this.input.is_empty() && this.front.at_frame_boundary() {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut chunk = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.socket).poll_read(cx, &mut chunk))?;
            if chunk.filled().is_empty() {
                this.socket_eof = true;
            }
            this.input.extend_from_slice(chunk.filled());
        }
    }
}

impl AsyncWrite for NormalisedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().socket).poll_shutdown(cx)
    }
}

impl Connected for NormalisedStream {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.socket.connect_info()
    }
}

/// Where the front is in the client's byte stream.
enum Position {
    /// Before the connection preface.
    Preface,
    /// At the start of a frame.
    FrameHead,
    /// Inside a frame payload passed verbatim: this many bytes of it are still to come.
    Verbatim(usize),
}

/// The read side's state: position in the stream, an open header block, HPACK state.
struct Front {
    position: Position,
    open_block: Option<OpenBlock>,
    rewriter: HeaderRewriter,
}

impl Front {
    fn new() -> Front {
        Front {
            position: Position::Preface,
            open_block: None,
            rewriter: HeaderRewriter::new(),
        }
    }

    fn verbatim_remaining(&self) -> usize {
        match self.position {
            Position::Verbatim(remaining) => remaining,
            _ => 0,
        }
    }

    fn passed_verbatim(&mut self, n: usize) {
        let remaining = self.verbatim_remaining() - n;
        self.position = if remaining == 0 {
            Position::FrameHead
        } else {
            Position::Verbatim(remaining)
        };
    }

    /// Whether the client could end its connection here without cutting a frame.
    fn at_frame_boundary(&self) -> bool {
        matches!(self.position, Position::FrameHead) && self.open_block.is_none()
    }

    /// Takes what it can from the front of `input` and appends what the server should
    /// read to `output`.
    fn feed(&mut self, input: &mut Vec<u8>, output: &mut Vec<u8>) -> io::Result<()> {
        let mut at = 0;
        let outcome = self.feed_from(input, &mut at, output);
        input.drain(..at);
        outcome
    }

    fn feed_from(&mut self, input: &[u8], at: &mut usize, output: &mut Vec<u8>) -> io::Result<()> {
        loop {
            let rest = &input[*at..];
            match self.position {
                Position::Preface => {
                    if rest.len() < PREFACE.len() {
                        return Ok(());
                    }
                    if &rest[..PREFACE.len()] != PREFACE {
                        // Not HTTP/2: h2 refuses it from these bytes alone.
                        output.extend_from_slice(&rest[..PREFACE.len()]);
                        *at += PREFACE.len();
                        return Err(invalid("the connection preface is not HTTP/2's"));
                    }
                    output.extend_from_slice(PREFACE);
                    *at += PREFACE.len();
                    self.position = Position::FrameHead;
                }
                Position::Verbatim(remaining) => {
                    if rest.is_empty() {
                        return Ok(());
                    }
                    let n = remaining.min(rest.len());
                    output.extend_from_slice(&rest[..n]);
                    *at += n;
                    self.passed_verbatim(n);
                }
                Position::FrameHead => {
                    let Some(head) = rest.first_chunk::<FRAME_HEAD_LEN>() else {
                        return Ok(());
                    };
                    let frame = FrameHead::parse(head);
                    let len = frame.len as usize;
                    let is_header_frame =
                        frame.kind == FRAME_HEADERS || frame.kind == FRAME_CONTINUATION;
                    if !is_header_frame && self.open_block.is_none() {
                        output.extend_from_slice(head);
                        *at += FRAME_HEAD_LEN;
                        if len > 0 {
                            self.position = Position::Verbatim(len);
                        }
                        continue;
                    }
                    let gathered = self.open_block.as_ref().map_or(0, |b| b.fragment.len());
                    if gathered + len > MAX_HEADER_BLOCK {
                        return Err(invalid("a header block is larger than the front accepts"));
                    }
                    if rest.len() < FRAME_HEAD_LEN + len {
                        return Ok(());
                    }
                    let payload = &rest[FRAME_HEAD_LEN..FRAME_HEAD_LEN + len];
                    *at += FRAME_HEAD_LEN + len;
                    self.header_frame(&frame, payload, output)?;
                }
            }
        }
    }

    fn header_frame(
        &mut self,
        frame: &FrameHead,
        payload: &[u8],
        output: &mut Vec<u8>,
    ) -> io::Result<()> {
        match (frame.kind, self.open_block.as_mut()) {
            (FRAME_HEADERS, None) => {
                let block = OpenBlock::from_headers(frame, payload)?;
                if frame.flags & FLAG_END_HEADERS != 0 {
                    output.extend_from_slice(&self.rewriter.rewrite(block)?);
                } else {
                    self.open_block = Some(block);
                }
                Ok(())
            }
            (FRAME_CONTINUATION, Some(block)) if frame.stream == block.stream => {
                block.fragment.extend_from_slice(payload);
                if frame.flags & FLAG_END_HEADERS != 0 {
                    let block = self.open_block.take().expect("matched Some above");
                    output.extend_from_slice(&self.rewriter.rewrite(block)?);
                }
                Ok(())
            }
            // RFC 9113 6.10: only CONTINUATION frames of its stream may follow an open
            // header block, and none may come without one. h2 would end the connection.
            _ => Err(invalid("a header block was interrupted")),
        }
    }
}

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

struct FrameHead {
    len: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(head: &[u8; FRAME_HEAD_LEN]) -> FrameHead {
        FrameHead {
            len: u32::from_be_bytes([0, head[0], head[1], head[2]]),
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        }
    }
}

/// A header block being gathered: what its HEADERS frame said, and the HPACK bytes.
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    /// The 5 priority octets, when the HEADERS frame carried them.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

impl OpenBlock {
    fn from_headers(frame: &FrameHead, payload: &[u8]) -> io::Result<OpenBlock> {
        let mut body = payload;
        let mut padding = 0usize;
        if frame.flags & FLAG_PADDED != 0 {
            let (&pad_len, rest) = body
                .split_first()
                .ok_or_else(|| invalid("a padded HEADERS frame is empty"))?;
            padding = usize::from(pad_len);
            body = rest;
        }
        let mut priority = None;
        if frame.flags & FLAG_PRIORITY != 0 {
            let (fields, rest) = body
                .split_first_chunk::<5>()
                .ok_or_else(|| invalid("a HEADERS frame's priority fields are cut short"))?;
            priority = Some(*fields);
            body = rest;
        }
        let fragment_len = body
            .len()
            .checked_sub(padding)
            .ok_or_else(|| invalid("a HEADERS frame's padding is longer than the frame"))?;
        Ok(OpenBlock {
            stream: frame.stream,
            end_stream: frame.flags & FLAG_END_STREAM != 0,
            priority,
            fragment: body[..fragment_len].to_vec(),
        })
    }
}

/// The client's HPACK state and the rewrite of its header blocks.
struct HeaderRewriter {
    decoder: loona_hpack::Decoder<'static>,
}

impl HeaderRewriter {
    fn new() -> HeaderRewriter {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HPACK_TABLE_SIZE);
        HeaderRewriter { decoder }
    }

    /// The frames that carry `block` to the server, with its `:authority` made valid.
    fn rewrite(&mut self, block: OpenBlock) -> io::Result<Vec<u8>> {
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        let mut list_size = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                list_size = list_size.saturating_add(name.len() + value.len() + 32);
                if list_size <= MAX_HEADER_LIST {
                    let value = usable_value(&name, value);
                    encode_literal(&mut encoded, &name, &value);
                }
            })
            .map_err(|err| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("undecodable header block: {err:?}"),
                )
            })?;
        if list_size > MAX_HEADER_LIST {
            return Err(invalid("a header list is larger than the front accepts"));
        }
        Ok(frames_for(&block, &encoded))
    }
}

/// The value to pass on: `:authority` only changes when h2 would refuse it.
fn usable_value<'a>(name: &[u8], value: Cow<'a, [u8]>) -> Cow<'a, [u8]> {
    if name == b":authority" && http::uri::Authority::try_from(&*value).is_err() {
        Cow::Borrowed(REPLACEMENT_AUTHORITY)
    } else {
        value
    }
}

/// HPACK "literal header field without indexing, new name" (RFC 7541 6.2.2), strings
/// not Huffman-coded.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_string(out, name);
    encode_string(out, value);
}

fn encode_string(out: &mut Vec<u8>, bytes: &[u8]) {
    // A 7-bit prefix integer with the Huffman bit clear (RFC 7541 5.1, 5.2).
    let mut len = bytes.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len % 0x80) as u8 | 0x80);
            len /= 0x80;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(bytes);
}

/// A HEADERS frame and as many CONTINUATION frames as `encoded` needs.
fn frames_for(block: &OpenBlock, encoded: &[u8]) -> Vec<u8> {
    let priority_len = if block.priority.is_some() { 5 } else { 0 };
    let first_len = encoded.len().min(MAX_FRAME_PAYLOAD - priority_len);
    let (first, mut rest) = encoded.split_at(first_len);
    let mut out = Vec::with_capacity(encoded.len() + 2 * FRAME_HEAD_LEN + priority_len);

    let mut flags = 0;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    push_head(
        &mut out,
        priority_len + first.len(),
        FRAME_HEADERS,
        flags,
        block.stream,
    );
    if let Some(priority) = block.priority {
        out.extend_from_slice(&priority);
    }
    out.extend_from_slice(first);

    while !rest.is_empty() {
        let (chunk, remaining) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        rest = remaining;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        push_head(
            &mut out,
            chunk.len(),
            FRAME_CONTINUATION,
            flags,
            block.stream,
        );
        out.extend_from_slice(chunk);
    }
    out
}

fn push_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let len = u32::try_from(len).expect("frame payloads are cut to 16 KiB");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kind, flags and stream of each frame.
    type Heads = Vec<(u8, u8, u32)>;
    type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

    fn decode_all(frames: &[u8]) -> (Heads, HeaderList) {
        let mut heads = Vec::new();
        let mut fragment = Vec::new();
        let mut at = 0;
        while at < frames.len() {
            let head = FrameHead::parse(frames[at..at + FRAME_HEAD_LEN].try_into().unwrap());
            let mut body = &frames[at + FRAME_HEAD_LEN..at + FRAME_HEAD_LEN + head.len as usize];
            if head.flags & FLAG_PRIORITY != 0 {
                body = &body[5..];
            }
            fragment.extend_from_slice(body);
            heads.push((head.kind, head.flags, head.stream));
            at += FRAME_HEAD_LEN + head.len as usize;
        }
        let headers = loona_hpack::Decoder::new().decode(&fragment).unwrap();
        (heads, headers)
    }

    fn block(fragment: Vec<u8>) -> OpenBlock {
        OpenBlock {
            stream: 3,
            end_stream: true,
            priority: None,
            fragment,
        }
    }

    fn request(authority: &[u8]) -> Vec<(&[u8], &[u8])> {
        vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/kiln.driver.v1.Driver/List"),
            (b":authority", authority),
            (b"te", b"trailers"),
        ]
    }

    #[test]
    fn authorities_h2_refuses_become_localhost_and_valid_ones_stay() {
        for (sent, expected) in [
            (&b"tmp%2Fkiln%2Fkiln.sock"[..], &b"localhost"[..]),
            (b"/tmp/kiln/kiln.sock", b"localhost"),
            (b"localhost", b"localhost"),
            (b"kiln.invalid:80", b"kiln.invalid:80"),
        ] {
            let mut encoder = loona_hpack::Encoder::new();
            let fragment = encoder.encode(request(sent));
            let mut rewriter = HeaderRewriter::new();
            let (heads, headers) = decode_all(&rewriter.rewrite(block(fragment)).unwrap());
            assert_eq!(
                heads,
                [(FRAME_HEADERS, FLAG_END_STREAM | FLAG_END_HEADERS, 3)]
            );
            let authority = headers
                .iter()
                .find(|(name, _)| name == b":authority")
                .unwrap();
            assert_eq!(authority.1, expected, "{}", String::from_utf8_lossy(sent));
            assert_eq!(headers.len(), 5, "no other field is lost");
        }
    }

    #[test]
    fn the_clients_dynamic_table_is_followed_across_blocks() {
        // The encoder indexes fields in its dynamic table on the first request and refers
        // to them by index on the second; the rewriter must decode both alike.
        let mut encoder = loona_hpack::Encoder::new();
        let mut rewriter = HeaderRewriter::new();
        for _ in 0..3 {
            let fragment = encoder.encode(request(b"tmp%2Fkiln.sock"));
            let (_, headers) = decode_all(&rewriter.rewrite(block(fragment)).unwrap());
            assert!(headers.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
            assert!(headers.contains(&(b"te".to_vec(), b"trailers".to_vec())));
        }
    }

    #[test]
    fn large_blocks_are_cut_into_continuations_and_priority_is_kept() {
        let big = vec![b'x'; 40_000];
        let mut fields = request(b"localhost");
        fields.push((b"x-big", &big));
        let fragment = loona_hpack::Encoder::new().encode(fields);
        let mut open = block(fragment);
        open.priority = Some([0, 0, 0, 1, 15]);
        let frames = HeaderRewriter::new().rewrite(open).unwrap();
        let (heads, headers) = decode_all(&frames);
        assert_eq!(
            heads[0],
            (FRAME_HEADERS, FLAG_END_STREAM | FLAG_PRIORITY, 3)
        );
        assert!(heads[1..]
            .iter()
            .all(|(kind, _, _)| *kind == FRAME_CONTINUATION));
        assert_eq!(heads.last().unwrap().1, FLAG_END_HEADERS);
        assert_eq!(frames[FRAME_HEAD_LEN..FRAME_HEAD_LEN + 5], [0, 0, 0, 1, 15]);
        assert!(headers.contains(&(b"x-big".to_vec(), big)));
    }

    #[test]
    fn padded_headers_lose_the_padding_only() {
        let fragment = loona_hpack::Encoder::new().encode(request(b"/tmp/s"));
        let mut payload = vec![4u8];
        payload.extend_from_slice(&fragment);
        payload.extend_from_slice(&[0; 4]);
        let head = FrameHead {
            len: payload.len() as u32,
            kind: FRAME_HEADERS,
            flags: FLAG_PADDED | FLAG_END_HEADERS,
            stream: 1,
        };
        let open = OpenBlock::from_headers(&head, &payload).unwrap();
        assert_eq!(open.fragment, fragment);
        let bad = FrameHead { len: 2, ..head };
        assert!(OpenBlock::from_headers(&bad, &[9, 0]).is_err());
    }

    #[test]
    fn a_header_list_that_decodes_past_the_bound_is_refused() {
        // One 4 KiB field in the dynamic table, then referenced by index many times: a
        // few bytes on the wire that would decode to megabytes.
        let value = vec![b'v'; 4000];
        let mut encoder = loona_hpack::Encoder::new();
        let mut fragment = encoder.encode(vec![(&b"x-amplify"[..], &value[..])]);
        let index = encoder.encode(vec![(&b"x-amplify"[..], &value[..])]);
        for _ in 0..100 {
            fragment.extend_from_slice(&index);
        }
        assert!(HeaderRewriter::new().rewrite(block(fragment)).is_err());
    }

    #[test]
    fn long_strings_use_the_integer_continuation() {
        let mut out = Vec::new();
        encode_string(&mut out, &[b'a'; 300]);
        // 300 - 127 = 173 = 0b1_0101101 -> 0xad 0x01
        assert_eq!(out[..3], [0x7f, 0xad, 0x01]);
        assert_eq!(out.len(), 303);
    }

    /// Feeds `input` to a new front in pieces of `piece` bytes, as reads would deliver it.
    fn feed_in_pieces(input: &[u8], piece: usize) -> io::Result<Vec<u8>> {
        let mut front = Front::new();
        let (mut pending, mut output) = (Vec::new(), Vec::new());
        for chunk in input.chunks(piece) {
            pending.extend_from_slice(chunk);
            front.feed(&mut pending, &mut output)?;
        }
        assert!(pending.is_empty(), "the front took every byte");
        assert!(front.at_frame_boundary());
        Ok(output)
    }

    #[test]
    fn other_frames_pass_unchanged_however_the_bytes_arrive() {
        let mut input = PREFACE.to_vec();
        push_head(&mut input, 0, 0x4, 0, 0); // SETTINGS
        push_head(&mut input, 3, 0x0, FLAG_END_STREAM, 1); // DATA
        input.extend_from_slice(b"abc");
        for piece in [1, 2, 7, 1000] {
            assert_eq!(
                feed_in_pieces(&input, piece).unwrap(),
                input,
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn header_blocks_are_rewritten_however_the_bytes_arrive() {
        let fragment = loona_hpack::Encoder::new().encode(request(b"/tmp/kiln.sock"));
        let (first, second) = fragment.split_at(fragment.len() / 2);
        let mut input = PREFACE.to_vec();
        push_head(&mut input, first.len(), FRAME_HEADERS, 0, 1);
        input.extend_from_slice(first);
        push_head(
            &mut input,
            second.len(),
            FRAME_CONTINUATION,
            FLAG_END_HEADERS,
            1,
        );
        input.extend_from_slice(second);
        for piece in [1, 5, 1000] {
            let output = feed_in_pieces(&input, piece).unwrap();
            assert_eq!(output[..PREFACE.len()], *PREFACE);
            let (heads, headers) = decode_all(&output[PREFACE.len()..]);
            assert_eq!(heads, [(FRAME_HEADERS, FLAG_END_HEADERS, 1)]);
            assert!(headers.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
        }
    }

    #[test]
    fn an_interrupted_block_or_a_stray_continuation_closes() {
        let fragment = loona_hpack::Encoder::new().encode(request(b"x"));
        let mut input = PREFACE.to_vec();
        push_head(&mut input, fragment.len(), FRAME_HEADERS, 0, 1);
        input.extend_from_slice(&fragment);
        push_head(&mut input, 0, 0x4, 0, 0);
        let err = feed_in_pieces(&input, 1000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let mut input = PREFACE.to_vec();
        push_head(&mut input, 0, FRAME_CONTINUATION, FLAG_END_HEADERS, 1);
        assert!(feed_in_pieces(&input, 1000).is_err());
    }

    #[test]
    fn an_oversized_header_frame_is_refused_before_it_is_buffered() {
        let mut input = PREFACE.to_vec();
        push_head(&mut input, MAX_HEADER_BLOCK + 1, FRAME_HEADERS, 0, 1);
        let err = feed_in_pieces(&input, 1000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
