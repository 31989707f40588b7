//! Watches the client→portal direction of a WebSocket for data frames (text, binary,
//! continuation), so they count as session activity while pings and pongs do not. Bytes pass
//! through unchanged; only frame headers are parsed.

/// Incremental frame-boundary tracker.
#[derive(Debug, Default)]
pub struct FrameWatch {
    header: Vec<u8>,
    payload_left: u64,
}

impl FrameWatch {
    /// Feeds bytes; returns how many data frames started in them.
    pub fn feed(&mut self, mut bytes: &[u8]) -> usize {
        let mut data_frames = 0;
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = (self.payload_left.min(bytes.len() as u64)) as usize;
                self.payload_left -= skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            self.header.push(bytes[0]);
            bytes = &bytes[1..];
            if let Some((opcode, len)) = parse_header(&self.header) {
                if matches!(opcode, 0x0..=0x2) {
                    data_frames += 1;
                }
                self.payload_left = len;
                self.header.clear();
            }
        }
        data_frames
    }
}

/// (opcode, payload length) once `h` holds a whole frame header.
fn parse_header(h: &[u8]) -> Option<(u8, u64)> {
    if h.len() < 2 {
        return None;
    }
    let opcode = h[0] & 0x0f;
    let masked = h[1] & 0x80 != 0;
    let (len, at) = match h[1] & 0x7f {
        126 => (u64::from(u16::from_be_bytes([*h.get(2)?, *h.get(3)?])), 4),
        127 => {
            let b: [u8; 8] = h.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    let need = at + if masked { 4 } else { 0 };
    (h.len() >= need).then_some((opcode, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn counts_data_frames_not_pings_across_any_split() {
        let mut stream = vec![];
        stream.extend(frame(0x9, b"ping"));
        stream.extend(frame(0x1, b"hello"));
        stream.extend(frame(0xA, b""));
        stream.extend(frame(0x2, &vec![0u8; 70_000]));
        stream.extend(frame(0x9, &[0x81u8; 125]));
        stream.extend(frame(0x0, &vec![0u8; 300]));
        for split in [1usize, 2, 3, 7, 100, 4096, stream.len()] {
            let mut w = FrameWatch::default();
            let n: usize = stream.chunks(split).map(|c| w.feed(c)).sum();
            assert_eq!(n, 3, "split {split}");
        }
        let mut w = FrameWatch::default();
        assert_eq!(w.feed(&frame(0x9, b"x")), 0, "a ping alone is not activity");
    }
}
