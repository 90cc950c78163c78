//! The sending side of a media stream, sans-IO: frames into groups, each
//! group with a priority and a deadline, and a bound on what is in flight.

use std::collections::VecDeque;

use super::wire::{FrameRecord, GroupHeader, MediaKind, StreamId};
use super::wire::{MAX_FRAME_LEN, MediaWireError};

/// How a stream's frames are grouped and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SenderSettings {
    /// A new group starts at every key frame (video), and at the latest
    /// when the group's first frame is this old (audio and data: a group
    /// is this much media). Default: 200 ms for audio and data, 2,000 ms
    /// for video.
    pub group_ms: u32,
    /// A frame is of no use this long after its timestamp; a group whose
    /// newest frame is that old is reset, not delivered late. Default:
    /// 300 ms for audio, 1,000 ms for video and data.
    pub deadline_ms: u32,
    /// Groups in flight at once (sent, not yet finished or expired) before
    /// frames are refused. Default 8.
    pub max_groups: usize,
    /// Bytes in flight at once before frames are refused. Default 4 MiB.
    pub max_bytes: usize,
}

impl SenderSettings {
    /// The defaults for `kind`.
    pub fn for_kind(kind: MediaKind) -> Self {
        let (group_ms, deadline_ms) = match kind {
            MediaKind::Audio => (200, 300),
            MediaKind::Video => (2_000, 1_000),
            MediaKind::Data => (200, 1_000),
        };
        SenderSettings {
            group_ms,
            deadline_ms,
            max_groups: 8,
            max_bytes: 4 << 20,
        }
    }
}

/// Where a frame goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    /// The group.
    pub group: u64,
    /// `Some` when this frame opens the group: write the header first, on
    /// a new stream with `priority`.
    pub header: Option<GroupHeader>,
    /// The group's stream priority (audio above video above data; newer
    /// groups above older).
    pub priority: i32,
}

/// What became of a frame handed to [`MediaSender::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// To be written on its group's stream: the record's bytes.
    Send {
        /// Its sequence number.
        seq: u64,
        /// Its group.
        plan: GroupPlan,
        /// The frame record, encoded.
        bytes: Vec<u8>,
    },
    /// Refused: too much is in flight (the link is slower than the
    /// stream). The app should drop frames or lower its rate; a video
    /// stream refuses every frame until the next key frame, since the
    /// frames between would not decode.
    Dropped,
}

#[derive(Debug)]
struct InFlight {
    group: u64,
    first_ts_us: u64,
    expires_at_ms: u64,
    bytes: usize,
    finished: bool,
}

/// The sending side of one media stream.
#[derive(Debug)]
pub struct MediaSender {
    stream_id: StreamId,
    kind: MediaKind,
    settings: SenderSettings,
    next_seq: u64,
    next_group: u64,
    groups: VecDeque<InFlight>,
    waiting_for_key: bool,
    sent: u64,
    dropped: u64,
}

/// Base priority of a kind (shifted above any group number's share).
fn base(kind: MediaKind) -> i32 {
    match kind {
        MediaKind::Audio => 3,
        MediaKind::Video => 2,
        MediaKind::Data => 1,
    }
}

impl MediaSender {
    /// A sender for stream `stream_id` of `kind`.
    pub fn new(stream_id: StreamId, kind: MediaKind, settings: SenderSettings) -> Self {
        MediaSender {
            stream_id,
            kind,
            settings,
            next_seq: 0,
            next_group: 0,
            groups: VecDeque::new(),
            waiting_for_key: false,
            sent: 0,
            dropped: 0,
        }
    }

    /// The priority of group `group` of a `kind` stream.
    pub fn priority(kind: MediaKind, group: u64) -> i32 {
        (base(kind) << 24) + i32::try_from(group & 0xff_ffff).unwrap_or(0)
    }

    /// Frames sent and refused so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.sent, self.dropped)
    }

    fn in_flight_bytes(&self) -> usize {
        self.groups
            .iter()
            .filter(|g| !g.finished)
            .map(|g| g.bytes)
            .sum()
    }

    /// Takes a frame (timestamp in µs of the app's media clock, `key` for a
    /// key frame) at `now_ms`.
    pub fn submit(
        &mut self,
        timestamp_us: u64,
        key: bool,
        payload: Vec<u8>,
        now_ms: u64,
    ) -> Result<Submitted, MediaWireError> {
        if payload.len() > MAX_FRAME_LEN {
            return Err(MediaWireError::TooLarge(payload.len()));
        }
        // Groups finished or past their deadline no longer count.
        while self
            .groups
            .front()
            .is_some_and(|g| g.finished || g.expires_at_ms <= now_ms)
        {
            self.groups.pop_front();
        }
        let current = self.groups.back().filter(|g| !g.finished);
        let starts_group = match (self.kind, current) {
            (_, None) => true,
            (MediaKind::Video, Some(_)) if key => true,
            (_, Some(g)) => {
                timestamp_us.saturating_sub(g.first_ts_us)
                    >= u64::from(self.settings.group_ms) * 1000
            }
        };
        let open = self.groups.iter().filter(|g| !g.finished).count();
        let congested = self.in_flight_bytes() + payload.len() > self.settings.max_bytes
            || (starts_group && open >= self.settings.max_groups);
        if self.kind == MediaKind::Video && self.waiting_for_key && !key {
            self.dropped += 1;
            return Ok(Submitted::Dropped);
        }
        if congested {
            self.dropped += 1;
            if self.kind == MediaKind::Video {
                self.waiting_for_key = true;
            }
            return Ok(Submitted::Dropped);
        }
        self.waiting_for_key = false;
        let header = if starts_group {
            let group = self.next_group;
            self.next_group += 1;
            self.groups.push_back(InFlight {
                group,
                first_ts_us: timestamp_us,
                expires_at_ms: now_ms + u64::from(self.settings.deadline_ms),
                bytes: 0,
                finished: false,
            });
            Some(GroupHeader {
                stream_id: self.stream_id,
                group,
                deadline_ms: self.settings.deadline_ms,
            })
        } else {
            None
        };
        let Some(g) = self.groups.back_mut() else {
            return Ok(Submitted::Dropped);
        };
        g.expires_at_ms = now_ms + u64::from(self.settings.deadline_ms);
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut bytes = Vec::with_capacity(payload.len() + 21);
        FrameRecord {
            seq,
            timestamp_us,
            key,
            payload,
        }
        .encode_into(&mut bytes);
        g.bytes += bytes.len();
        self.sent += 1;
        Ok(Submitted::Send {
            seq,
            plan: GroupPlan {
                group: g.group,
                header,
                priority: Self::priority(self.kind, g.group),
            },
            bytes,
        })
    }

    /// Group `group`'s stream was delivered (finished): it no longer
    /// counts as in flight.
    pub fn finished(&mut self, group: u64) {
        if let Some(g) = self.groups.iter_mut().find(|g| g.group == group) {
            g.finished = true;
        }
    }

    /// The groups past their deadline at `now_ms` (their streams are to be
    /// reset); they no longer count as in flight.
    pub fn expired(&mut self, now_ms: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for g in self.groups.iter_mut() {
            if !g.finished && g.expires_at_ms <= now_ms {
                g.finished = true;
                out.push(g.group);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(s: Submitted) -> (u64, GroupPlan) {
        match s {
            Submitted::Send { seq, plan, .. } => (seq, plan),
            Submitted::Dropped => panic!("dropped"),
        }
    }

    #[test]
    fn video_groups_start_at_key_frames_and_audio_groups_by_time() {
        let mut v = MediaSender::new(
            1,
            MediaKind::Video,
            SenderSettings::for_kind(MediaKind::Video),
        );
        let (s0, g0) = sent(v.submit(0, true, vec![0; 10], 0).unwrap());
        let (s1, g1) = sent(v.submit(33_333, false, vec![0; 10], 33).unwrap());
        let (_, g2) = sent(v.submit(66_666, true, vec![0; 10], 66).unwrap());
        assert_eq!((s0, s1), (0, 1));
        assert!(g0.header.is_some() && g1.header.is_none() && g2.header.is_some());
        assert_eq!((g0.group, g1.group, g2.group), (0, 0, 1));
        assert!(g2.priority > g0.priority, "newer groups first");

        let mut a = MediaSender::new(
            2,
            MediaKind::Audio,
            SenderSettings::for_kind(MediaKind::Audio),
        );
        let groups: Vec<u64> = (0..25u64)
            .map(|i| {
                sent(a.submit(i * 20_000, false, vec![0; 4], i * 20).unwrap())
                    .1
                    .group
            })
            .collect();
        // 20 ms frames, 200 ms groups: ten frames a group.
        assert_eq!(groups[..10], [0; 10]);
        assert_eq!(groups[10..20], [1; 10]);
        assert_eq!(groups[20], 2);
        assert!(
            MediaSender::priority(MediaKind::Audio, 0)
                > MediaSender::priority(MediaKind::Video, 1 << 20),
            "audio above any video group"
        );
    }

    #[test]
    fn too_much_in_flight_is_refused_and_video_waits_for_a_key_frame() {
        let mut settings = SenderSettings::for_kind(MediaKind::Video);
        settings.max_bytes = 1000;
        let mut v = MediaSender::new(1, MediaKind::Video, settings);
        sent(v.submit(0, true, vec![0; 600], 0).unwrap());
        assert_eq!(
            v.submit(1, false, vec![0; 600], 1).unwrap(),
            Submitted::Dropped
        );
        // Room again, but the frames before the next key frame would not
        // decode: refused too.
        v.finished(0);
        assert_eq!(
            v.submit(2, false, vec![0; 10], 2).unwrap(),
            Submitted::Dropped
        );
        let (_, plan) = sent(v.submit(3, true, vec![0; 10], 3).unwrap());
        assert!(plan.header.is_some());
        assert_eq!(v.counts(), (2, 2));
        assert!(v.submit(4, false, vec![0; MAX_FRAME_LEN + 1], 4).is_err());
    }

    #[test]
    fn groups_past_their_deadline_expire() {
        let mut a = MediaSender::new(
            2,
            MediaKind::Audio,
            SenderSettings::for_kind(MediaKind::Audio),
        );
        sent(a.submit(0, false, vec![1], 0).unwrap());
        assert!(a.expired(299).is_empty());
        assert_eq!(a.expired(300), vec![0]);
        assert!(a.expired(400).is_empty());
    }
}
