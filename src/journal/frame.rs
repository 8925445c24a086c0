//! Record framing inside one journal region.
//!
//! A frame is `sync byte, payload length (u32 LE), tag (u8), payload, CRC-32
//! (u32 LE)`. The CRC covers the region generation, the length, the tag and the
//! payload, so a frame left over from an earlier use of the region never
//! validates. The bytes after the last frame are zero because the file is
//! zero-filled when created and a region is zeroed before it is reused.

/// First byte of every frame. It has six bits set, so one flipped bit never
/// turns it into the zero byte that marks free space.
pub const SYNC: u8 = 0xE7;

/// Bytes a frame adds around its payload: sync, length, tag and CRC.
pub const OVERHEAD: usize = 1 + 4 + 1 + 4;

/// Largest payload a frame may carry. A length field above this value is
/// damage, which keeps a flipped bit in a length from asking for gigabytes.
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Encodes one frame for a region of the given generation.
pub fn encode(generation: u64, tag: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= MAX_PAYLOAD, "callers check the payload size against MAX_PAYLOAD");
    let length = payload.len() as u32;

    let mut frame = Vec::with_capacity(OVERHEAD + payload.len());
    frame.push(SYNC);
    frame.extend_from_slice(&length.to_le_bytes());
    frame.push(tag);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(&checksum(generation, length, tag, payload).to_le_bytes());
    frame
}

fn checksum(generation: u64, length: u32, tag: u8, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&generation.to_le_bytes());
    hasher.update(&length.to_le_bytes());
    hasher.update(&[tag]);
    hasher.update(payload);
    hasher.finalize()
}

/// One valid frame found in a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// Offset of the sync byte from the start of the region.
    pub offset: usize,
    pub tag: u8,
    pub payload: &'a [u8],
}

impl RawFrame<'_> {
    pub fn end(&self) -> usize {
        self.offset + OVERHEAD + self.payload.len()
    }
}

/// Result of reading a region from a start offset to its end.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RegionScan<'a> {
    pub frames: Vec<RawFrame<'a>>,
    /// Offset right after the last valid frame: where the next append goes.
    pub end: usize,
    /// Bytes skipped between valid frames because they did not form a frame.
    pub damaged_bytes: usize,
    /// Number of damaged stretches between valid frames.
    pub damaged_spans: usize,
    /// Non-zero bytes after the last valid frame: a torn final write.
    pub torn_bytes: usize,
}

/// Decodes the frame that starts at `offset`, if a valid one does.
pub fn frame_at(region: &[u8], offset: usize, generation: u64) -> Option<RawFrame<'_>> {
    let header_end = offset.checked_add(6)?;
    if header_end > region.len() || region[offset] != SYNC {
        return None;
    }

    let length_bytes: [u8; 4] = region[offset + 1..offset + 5].try_into().ok()?;
    let length = u32::from_le_bytes(length_bytes);
    if length as usize > MAX_PAYLOAD {
        return None;
    }

    let tag = region[offset + 5];
    let payload_end = header_end + length as usize;
    let frame_end = payload_end + 4;
    if frame_end > region.len() {
        return None;
    }

    let payload = &region[header_end..payload_end];
    let stored: [u8; 4] = region[payload_end..frame_end].try_into().ok()?;
    if u32::from_le_bytes(stored) != checksum(generation, length, tag, payload) {
        return None;
    }
    Some(RawFrame { offset, tag, payload })
}

/// Reads every valid frame from `start` to the end of the region.
///
/// A stretch of bytes that is not a valid frame but is followed by one is
/// counted as damage and skipped. Non-zero bytes after the last valid frame are
/// counted as a torn write; the writer zeroes them before its next append.
pub fn scan(region: &[u8], start: usize, generation: u64) -> RegionScan<'_> {
    let mut result = RegionScan { end: start, ..RegionScan::default() };
    let mut position = start;

    while position < region.len() {
        if let Some(frame) = frame_at(region, position, generation) {
            position = frame.end();
            result.end = position;
            result.frames.push(frame);
            continue;
        }

        // Zero bytes are free space: jump to the next non-zero byte, if any.
        match region[position..].iter().position(|&byte| byte != 0) {
            None => break,
            Some(0) => {}
            Some(zeros) => {
                position += zeros;
                continue;
            }
        }

        let next_frame =
            (position + 1..region.len()).filter(|&candidate| region[candidate] == SYNC).find(|&candidate| frame_at(region, candidate, generation).is_some());
        match next_frame {
            Some(next) => {
                result.damaged_bytes += next - position;
                result.damaged_spans += 1;
                position = next;
            }
            None => {
                let last_non_zero = region.iter().rposition(|&byte| byte != 0).expect("region[position] is non-zero, so a non-zero byte exists");
                result.torn_bytes = last_non_zero + 1 - position;
                break;
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region_with(frames: &[Vec<u8>], size: usize) -> Vec<u8> {
        let mut region = vec![0u8; size];
        let mut offset = 0;
        for frame in frames {
            region[offset..offset + frame.len()].copy_from_slice(frame);
            offset += frame.len();
        }
        region
    }

    #[test]
    fn scan_reads_frames_in_order() {
        let frames = [encode(1, 7, b"first"), encode(1, 8, b"second")];
        let region = region_with(&frames, 256);

        let result = scan(&region, 0, 1);

        assert_eq!(result.frames.len(), 2);
        assert_eq!(result.frames[0].payload, b"first");
        assert_eq!(result.frames[1].tag, 8);
        assert_eq!(result.end, frames[0].len() + frames[1].len());
        assert_eq!(result.damaged_bytes, 0);
        assert_eq!(result.torn_bytes, 0);
    }

    #[test]
    fn frame_from_older_generation_is_invalid() {
        let region = region_with(&[encode(1, 7, b"old")], 64);

        let result = scan(&region, 0, 2);

        assert!(result.frames.is_empty());
        assert_eq!(result.end, 0);
        assert!(result.torn_bytes > 0);
    }

    #[test]
    fn damaged_middle_frame_is_skipped() {
        let frames = [encode(3, 1, b"aaaa"), encode(3, 1, b"bbbb"), encode(3, 1, b"cccc")];
        let mut region = region_with(&frames, 128);
        region[frames[0].len() + 7] ^= 0x10;

        let result = scan(&region, 0, 3);

        let payloads: Vec<&[u8]> = result.frames.iter().map(|frame| frame.payload).collect();
        assert_eq!(payloads, vec![&b"aaaa"[..], &b"cccc"[..]]);
        assert_eq!(result.damaged_spans, 1);
        assert_eq!(result.damaged_bytes, frames[1].len());
        assert_eq!(result.torn_bytes, 0);
    }

    #[test]
    fn huge_length_field_is_damage() {
        let mut frame = encode(1, 1, b"x");
        frame[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        let region = region_with(&[frame], 64);

        let result = scan(&region, 0, 1);

        assert!(result.frames.is_empty());
        assert_eq!(result.torn_bytes, 11);
    }
}
