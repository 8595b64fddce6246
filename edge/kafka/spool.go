package kafka

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// Spool is a durable, append-only queue of records on local disk, used while
// Kafka is unreachable. Records live in numbered segment files; each record
// is [length uint32][CRC-32C uint32][payload], so a torn write at the tail
// (a crash mid-append) is detected and cut off on open, and a corrupt
// region elsewhere is stepped over to the next whole record. Append writes a
// whole batch and fsyncs once (group commit). A cursor file remembers how
// far the records have been delivered; fully delivered segments are
// deleted. A crash between delivery and the cursor update re-delivers a few
// records, which downstream deduplication by event id absorbs.
//
// Spool is not safe for concurrent use except Depth, Size, Corrupt and
// CorruptBytes; the producer's single delivery goroutine owns it.
type Spool struct {
	dir    string
	id     string
	log    *slog.Logger
	maxSeg int64
	w      *os.File
	wseq   uint64
	wsize  int64
	rseq   uint64
	roff   int64
	depth  atomic.Int64
	lock   *os.File
	// maxBytes, when positive, bounds the spool's files on disk: an
	// Append that would take them past it is refused with ErrSpoolFull,
	// as a full disk refuses it. size is what the files hold now.
	maxBytes int64
	size     atomic.Int64
	// corrupt and corruptBytes count the corrupt regions skipped, each
	// once: badUpTo is just past the start of the last one counted.
	corrupt      atomic.Int64
	corruptBytes atomic.Int64
	badUpTo      SpoolCursor
	// tornBytes counts the bytes cut off the end of the segment being
	// written on open (a torn tail).
	tornBytes atomic.Int64
	// oldest is the earliest event time among the records pending when
	// the spool was opened (zero when none had one).
	oldest time.Time
	// dirty is set after a failed append: the next append starts a new
	// segment.
	dirty bool
	// ends holds, for a segment whose cut back after a failed append
	// failed too, where its last counted record ends: the bytes past it
	// can hold whole records of that append, which its retry writes
	// again, so Read stops there.
	ends map[uint64]int64
	// afterStep, set only by tests, is called between the steps of
	// emptying the spool, to see the directory as a crash there leaves it.
	afterStep func(step string)
	// cut, set only by tests, replaces the cut of a segment back to its
	// last whole record after a failed append.
	cut func(f *os.File, size int64) error
}

// SpoolCursor is a read position: a segment and a byte offset in it.
type SpoolCursor struct {
	Seq uint64
	Off int64
}

const (
	recordHeader   = 8
	maxRecord      = 1 << 20
	defaultSegment = 64 << 20
	cursorFile     = "cursor"
	idFile         = "spool-id"
	segSuffix      = ".seg"
	// endSuffix names a segment's end mark (see markEnd).
	endSuffix = ".end"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrSpoolFull refuses an Append that would take the spool's files past
// their bound.
var ErrSpoolFull = errors.New("spool: full (spool_max_bytes)")

// OpenSpool opens (creating if needed) the spool in dir, cuts off a torn
// tail, and counts the records not yet delivered. Corrupt regions are
// logged to log as they are found. maxBytes, when positive, bounds the
// spool's files on disk (see ErrSpoolFull); a spool already past it opens,
// and takes no more until it is back under.
func OpenSpool(dir string, log *slog.Logger, maxBytes int64) (*Spool, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_CREATE|os.O_RDWR, 0o640)
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("spool %s is in use by another edge process: %w", dir, err)
	}
	s := &Spool{dir: dir, log: log, maxSeg: defaultSegment, lock: lock, maxBytes: maxBytes}
	ok := false
	defer func() {
		if !ok {
			if s.w != nil {
				_ = s.w.Close()
			}
			_ = lock.Close() // releases the lock
		}
	}()
	if s.id, err = spoolID(dir); err != nil {
		return nil, err
	}
	seqs, err := s.segments()
	if err != nil {
		return nil, err
	}
	if b, err := os.ReadFile(filepath.Join(dir, cursorFile)); err == nil {
		f := strings.Fields(string(b))
		if len(f) == 2 {
			s.rseq, _ = strconv.ParseUint(f[0], 10, 64)
			s.roff, _ = strconv.ParseInt(f[1], 10, 64)
		}
	}
	if len(seqs) == 0 {
		s.wseq = max(s.rseq, 1)
		s.rseq, s.roff = s.wseq, 0
	} else {
		// Writing goes on at the cursor's segment when that is past every
		// segment on disk (the empty segment a drain started was removed
		// by hand): written below the cursor, new records were never read.
		s.wseq = max(seqs[len(seqs)-1], s.rseq)
		if s.rseq < seqs[0] {
			s.rseq, s.roff = seqs[0], 0
		}
	}
	if _, err := os.Stat(s.path(s.rseq)); errors.Is(err, os.ErrNotExist) {
		s.roff = 0 // its records are gone with it; a new one starts at 0
	}
	if st, err := os.Stat(s.path(s.rseq)); err == nil && st.Size() < s.roff {
		// A segment emptied in place after full delivery, as earlier
		// versions did, without the cursor update: nothing in it is
		// pending.
		s.roff = st.Size()
	}
	// Count pending records and find the valid end of the last segment.
	var depth, size int64
	for _, seq := range seqs {
		if seq < s.rseq {
			// Delivered, but its removal failed before. One that still
			// cannot be removed is still on disk, and counts against the
			// bound as long as it is.
			if err := os.Remove(s.path(seq)); err != nil && !errors.Is(err, os.ErrNotExist) {
				if st, err := os.Stat(s.path(seq)); err == nil {
					size += st.Size()
				}
			} else {
				_ = os.Remove(s.path(seq) + endSuffix)
			}
			continue
		}
		// The segment being written was never written past its mark (a
		// failed cut starts a new segment first): its torn tail is cut
		// below, and the whole records of the failed append before it,
		// whose retry the stop took with it, are kept. Its mark goes, or
		// it would cut short what is appended from now on.
		if end, ok := readEnd(s.path(seq) + endSuffix); ok && seq != s.wseq {
			if s.ends == nil {
				s.ends = map[uint64]int64{}
			}
			s.ends[seq] = end
		}
		if seq != s.wseq {
			if st, err := os.Stat(s.path(seq)); err == nil {
				size += st.Size()
			}
		}
		start := int64(0)
		if seq == s.rseq {
			start = s.roff
		}
		n, end, err := s.scan(seq, start)
		if err != nil {
			return nil, err
		}
		depth += n
		if seq == s.wseq {
			if err := os.Truncate(s.path(seq), end); err != nil {
				return nil, fmt.Errorf("spool: cut torn tail: %w", err)
			}
			s.wsize = end
			if err := os.Remove(s.path(seq) + endSuffix); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, fmt.Errorf("spool: remove an end mark: %w", err)
			}
		}
	}
	s.depth.Store(depth)
	s.w, err = os.OpenFile(s.path(s.wseq), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	if st, err := s.w.Stat(); err == nil {
		s.wsize = st.Size()
	}
	s.size.Store(size + s.wsize)
	ok = true
	return s, nil
}

func (s *Spool) path(seq uint64) string {
	return filepath.Join(s.dir, fmt.Sprintf("%016d%s", seq, segSuffix))
}

func (s *Spool) segments() ([]uint64, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	var seqs []uint64
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, segSuffix) {
			continue
		}
		if n, err := strconv.ParseUint(strings.TrimSuffix(name, segSuffix), 10, 64); err == nil {
			seqs = append(seqs, n)
		}
	}
	sort.Slice(seqs, func(i, j int) bool { return seqs[i] < seqs[j] })
	return seqs, nil
}

// scan counts the valid records of segment seq from off and returns where
// they end. Bytes after them that hold no whole record are a torn tail in
// the segment being written, cut off by the caller, and a corrupt region
// in any other.
func (s *Spool) scan(seq uint64, off int64) (n, end int64, err error) {
	limit := int64(-1)
	if e, ok := s.ends[seq]; ok {
		limit = e // what lies past its mark was never counted
	}
	sr, err := openSegment(s.path(seq), off, limit)
	if err != nil {
		return 0, 0, fmt.Errorf("spool: %w", err)
	}
	defer sr.close()
	for {
		at := sr.off
		p, skipped, err := sr.next()
		switch {
		case err == io.EOF && skipped > 0 && seq == s.wseq:
			// Most likely a write a crash cut short; records damaged on
			// disk there since look the same, so the bytes are counted.
			s.log.Warn("spool: cutting a torn tail", "segment", seq, "offset", at, "bytes", skipped)
			s.tornBytes.Add(skipped)
			return n, sr.off, nil
		case err == io.EOF:
			s.skipped(seq, at, skipped)
			return n, sr.off, nil
		case err != nil:
			return 0, 0, fmt.Errorf("spool: %w", err)
		}
		s.skipped(seq, at, skipped)
		if t, ok := recordTime(p); ok && (s.oldest.IsZero() || t.Before(s.oldest)) {
			s.oldest = t
		}
		n++
	}
}

// timeField starts an event's time in the JSON schemas.Event.AppendJSON
// writes. Only id, account_id, env, key_id and type come before it, and
// none of them can hold a quote unescaped, so its first match is the
// event's own.
var timeField = []byte(`,"time":"`)

// recordTime is the time of the event a spooled record holds, read without
// decoding the rest of it.
func recordTime(p []byte) (time.Time, bool) {
	i := bytes.Index(p, timeField)
	if i < 0 {
		return time.Time{}, false
	}
	p = p[i+len(timeField):]
	j := bytes.IndexByte(p, '"')
	if j < 0 {
		return time.Time{}, false
	}
	t, err := time.Parse(time.RFC3339Nano, string(p[:j]))
	return t, err == nil
}

// Oldest is the earliest event time among the records that were pending
// when the spool was opened; ok is false when there were none (or none
// could be read). Server-reported usage can be weeks old and anywhere in
// the spool, so its first record does not stand for its oldest.
func (s *Spool) Oldest() (time.Time, bool) { return s.oldest, !s.oldest.IsZero() }

// skipped counts and logs a corrupt region of n bytes at off in segment
// seq, once however often it is read.
func (s *Spool) skipped(seq uint64, off, n int64) {
	at := SpoolCursor{Seq: seq, Off: off}
	if n == 0 || at.before(s.badUpTo) {
		return
	}
	s.badUpTo = SpoolCursor{Seq: seq, Off: off + 1}
	s.corrupt.Add(1)
	s.corruptBytes.Add(n)
	s.log.Error("spool: skipping a corrupt region; the events in it are not delivered",
		"segment", seq, "offset", off, "bytes", n)
}

func (c SpoolCursor) before(d SpoolCursor) bool {
	return c.Seq < d.Seq || c.Seq == d.Seq && c.Off < d.Off
}

// segmentReader reads the records of one segment in order, up to a limit,
// stepping over corrupt regions.
type segmentReader struct {
	f     *os.File
	r     *bufio.Reader
	off   int64 // where the next record starts
	limit int64 // where the readable bytes end
}

// openSegment opens the segment at path to read from off up to limit, or
// to its end if limit is negative.
func openSegment(path string, off, limit int64) (*segmentReader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	if limit < 0 {
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, err
		}
		limit = st.Size()
	}
	sr := &segmentReader{f: f, limit: limit}
	sr.seek(off)
	return sr, nil
}

func (sr *segmentReader) seek(off int64) {
	sr.off = off
	rest := io.NewSectionReader(sr.f, off, max(sr.limit-off, 0))
	if sr.r == nil {
		sr.r = bufio.NewReaderSize(rest, 1<<16)
	} else {
		sr.r.Reset(rest)
	}
}

func (sr *segmentReader) close() { _ = sr.f.Close() }

// next returns the next record, and how many bytes before it held no whole
// record and were skipped. At the end it returns io.EOF; skipped is then
// the size of what is left that holds no whole record, and the reader
// stays at its start.
func (sr *segmentReader) next() (p []byte, skipped int64, err error) {
	p, err = readRecord(sr.r)
	if err == nil {
		sr.off += recordHeader + int64(len(p))
		return p, 0, nil
	}
	if err != errTorn {
		return nil, 0, err
	}
	at, found, err := sr.resync(sr.off + 1)
	if err != nil {
		return nil, 0, err
	}
	if !found {
		return nil, sr.limit - sr.off, io.EOF
	}
	skipped = at - sr.off
	sr.seek(at)
	if p, err = readRecord(sr.r); err != nil {
		return nil, 0, fmt.Errorf("reread record at %d: %w", at, err)
	}
	sr.off += recordHeader + int64(len(p))
	return p, skipped, nil
}

// resync finds the first offset from off where a whole record starts: a
// length that is not zero and fits, and a payload whose CRC-32C is the one
// in the header. A false match is all but impossible: besides the 32-bit
// checksum, a length under maxRecord has a zero first byte, which no
// event's JSON holds, so no match starts inside a record's payload.
func (sr *segmentReader) resync(off int64) (int64, bool, error) {
	r := bufio.NewReaderSize(io.NewSectionReader(sr.f, off, max(sr.limit-off, 0)), 1<<16)
	var p []byte
	for at := off; at+recordHeader <= sr.limit; at++ {
		h, err := r.Peek(recordHeader)
		if err == io.EOF {
			break // the file ends before the limit
		}
		if err != nil {
			return 0, false, err
		}
		n := int64(binary.BigEndian.Uint32(h[:4]))
		if n > 0 && n <= maxRecord && at+recordHeader+n <= sr.limit {
			if int64(cap(p)) < n {
				p = make([]byte, n)
			}
			p = p[:n]
			_, err := sr.f.ReadAt(p, at+recordHeader)
			if err != nil && err != io.EOF {
				return 0, false, err
			}
			if err == nil && crc32.Checksum(p, castagnoli) == binary.BigEndian.Uint32(h[4:]) {
				return at, true, nil
			}
		}
		if _, err := r.Discard(1); err != nil {
			return 0, false, err
		}
	}
	return 0, false, nil
}

var errTorn = errors.New("torn or corrupt record")

// readRecord reads one record: io.EOF at a clean end, errTorn for a record
// cut short or failing its checks, and any other error from r as it is, so
// a failing disk is not taken for corrupt data.
func readRecord(r io.Reader) ([]byte, error) {
	var h [recordHeader]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if err == io.ErrUnexpectedEOF {
			return nil, errTorn
		}
		return nil, err
	}
	n := binary.BigEndian.Uint32(h[:4])
	if n == 0 || n > maxRecord {
		// No record is empty (Append refuses them): eight zero bytes
		// would otherwise read as one, and a stretch of zeros, as a power
		// loss can leave in a file, as many.
		return nil, errTorn
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(r, p); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil, errTorn
		}
		return nil, err
	}
	if crc32.Checksum(p, castagnoli) != binary.BigEndian.Uint32(h[4:]) {
		return nil, errTorn
	}
	return p, nil
}

// Append writes recs and fsyncs once: when it returns nil, every record
// survives a crash.
func (s *Spool) Append(recs [][]byte) error {
	if len(recs) == 0 {
		return nil
	}
	size := 0
	for _, r := range recs {
		size += recordHeader + len(r)
	}
	removed := s.removedUnderUs()
	if removed {
		// Someone removed the segment being written from the spool
		// directory (a clean-up of what looked like an empty file, or
		// of a full disk): records written on through the open file
		// would be counted as spooled and never read. Its undelivered
		// records are gone; the drain reports them lost. New ones go to
		// a new segment, and the spool's size is what is on disk again.
		s.log.Error("spool: the segment being written was removed from the spool directory; its undelivered events are lost. "+
			"Never remove files from edge.spool_dir by hand", "segment", s.wseq)
		s.dirty = true
	}
	if s.wsize >= s.maxSeg || s.dirty {
		if err := s.roll(); err != nil {
			return err
		}
	}
	if removed {
		s.size.Store(s.sizeOnDisk())
	}
	if s.maxBytes > 0 && s.size.Load()+int64(size) > s.maxBytes {
		// Full by the count; the disk has the last word, should segments
		// have been removed by hand to make room (once a retry, a second).
		if s.size.Store(s.sizeOnDisk()); s.size.Load()+int64(size) > s.maxBytes {
			return ErrSpoolFull
		}
	}
	buf := make([]byte, 0, size)
	for _, r := range recs {
		if len(r) > maxRecord {
			return fmt.Errorf("spool: record of %d bytes is larger than %d", len(r), maxRecord)
		}
		if len(r) == 0 {
			return errors.New("spool: empty record")
		}
		buf = binary.BigEndian.AppendUint32(buf, uint32(len(r)))
		buf = binary.BigEndian.AppendUint32(buf, crc32.Checksum(r, castagnoli))
		buf = append(buf, r...)
	}
	if _, err := s.w.Write(buf); err != nil {
		s.undo()
		return fmt.Errorf("spool: write: %w", err)
	}
	if err := s.w.Sync(); err != nil {
		s.undo()
		return fmt.Errorf("spool: fsync: %w", err)
	}
	s.wsize += int64(len(buf))
	s.size.Add(int64(len(buf)))
	s.depth.Add(int64(len(recs)))
	return nil
}

// sizeOnDisk is what the spool's segments take on disk now, the segment
// being written included, for when one was removed from under the count.
func (s *Spool) sizeOnDisk() int64 {
	seqs, err := s.segments()
	if err != nil {
		return s.size.Load()
	}
	var n int64
	for _, seq := range seqs {
		if st, err := os.Stat(s.path(seq)); err == nil {
			n += st.Size()
		}
	}
	return n
}

// removedUnderUs reports whether the segment being written no longer has a
// name in the spool directory: one stat of the open file, made once per
// group commit, and a look for its name when that says it has none (a
// filesystem that does not count links may say so of every file).
func (s *Spool) removedUnderUs() bool {
	st, err := s.w.Stat()
	if err != nil {
		return false
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); !ok || sys.Nlink != 0 {
		return false
	}
	_, err = os.Stat(s.path(s.wseq))
	return errors.Is(err, os.ErrNotExist)
}

// undo follows a failed write or fsync. The segment may now hold part of
// the batch past wsize (a full disk takes some bytes and refuses the rest),
// and after a failed fsync the kernel's copy of the page is in doubt. Cut
// the segment back to its last whole record and start a new segment with
// the next append, so no later record is ever written behind bytes that
// were not counted; if the cut fails, the segment is read up to its last
// counted record and skipped from there (ends), and that end is marked on
// disk (markEnd) for a restart to read it so too. Only if the mark cannot
// be written either does a restart before delivery read the segment whole:
// whole records of the failed append are then sent twice, once from each
// segment (ingest counts each event once), and its torn end is reported as
// a corrupt region though nothing in it was counted.
func (s *Spool) undo() {
	cut := (*os.File).Truncate
	if s.cut != nil {
		cut = s.cut
	}
	if err := cut(s.w, s.wsize); err != nil {
		// What the write left past the last whole record is still on
		// disk: it counts against the bound until the segment is
		// removed, which takes the segment's whole size off again.
		if st, err := s.w.Stat(); err == nil && st.Size() > s.wsize {
			s.size.Add(st.Size() - s.wsize)
		}
		// It may hold whole records, which the append's retry writes
		// again: reading them here too would send them twice and count
		// them off the depth twice.
		if s.ends == nil {
			s.ends = map[uint64]int64{}
		}
		s.ends[s.wseq] = s.wsize
		if err := markEnd(s.path(s.wseq)+endSuffix, s.wsize, s.dir); err != nil {
			s.log.Warn("spool: could not mark where a segment's counted records end; a restart before it is delivered "+
				"sends some events twice (ingest counts each once) and reports its end as corrupt",
				"segment", s.wseq, "offset", s.wsize, "err", err)
		}
		s.dirty = true
		return
	}
	// A segment cut back to empty holds nothing to write behind: the next
	// append takes it again. Starting another left one empty file behind
	// for every retry while the disk was full (an append a second).
	if s.wsize > 0 {
		s.dirty = true
	}
}

// markEnd writes a segment's end mark at path: the offset its counted
// records end at, durably, so that a restart reads the segment up to
// there and no further.
func markEnd(path string, end int64, dir string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o640)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(strconv.FormatInt(end, 10) + "\n"); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return syncDir(dir)
}

// readEnd reads a segment's end mark; ok is false when there is none, or
// it cannot be read whole (a mark torn by a crash: the segment is then
// read to its end, as without one).
func readEnd(path string) (int64, bool) {
	b, err := os.ReadFile(path)
	if err != nil || len(b) < 2 || b[len(b)-1] != '\n' {
		return 0, false
	}
	end, err := strconv.ParseInt(string(b[:len(b)-1]), 10, 64)
	return end, err == nil && end >= 0
}

// roll starts the next segment. The new file is opened, and its name made
// durable, before anything changes: a roll that fails (no file descriptor,
// a full disk, an I/O error) leaves the spool writing to its current
// segment, and the next append tries again.
func (s *Spool) roll() error {
	w, err := os.OpenFile(s.path(s.wseq+1), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("spool: new segment: %w", err)
	}
	if err := syncDir(s.dir); err != nil {
		_ = w.Close()
		return fmt.Errorf("spool: new segment: %w", err)
	}
	// Every record in the old segment was fsynced by its append, so an
	// error closing it loses nothing.
	_ = s.w.Close()
	s.w, s.wseq, s.wsize, s.dirty = w, s.wseq+1, 0, false
	return nil
}

// Read returns up to max undelivered records in order, and the cursor to
// Commit once they are delivered.
func (s *Spool) Read(max int) ([][]byte, SpoolCursor, error) {
	cur := SpoolCursor{Seq: s.rseq, Off: s.roff}
	var out [][]byte
	for len(out) < max && cur.Seq <= s.wseq {
		last := cur.Seq == s.wseq
		limit := int64(-1)
		if end, ok := s.ends[cur.Seq]; ok {
			limit = end
		}
		if last {
			limit = s.wsize
			if cur.Off >= limit {
				break
			}
		}
		sr, err := openSegment(s.path(cur.Seq), cur.Off, limit)
		if errors.Is(err, os.ErrNotExist) {
			if last {
				// The cursor never passes the segment being written,
				// or Drained could never be true again.
				break
			}
			cur = SpoolCursor{Seq: cur.Seq + 1}
			continue
		}
		if err != nil {
			return nil, cur, fmt.Errorf("spool: %w", err)
		}
		for len(out) < max {
			at := sr.off
			p, skipped, err := sr.next()
			s.skipped(cur.Seq, at, skipped)
			if err == io.EOF {
				// Past the segment's last record, and past any bytes after
				// it that hold none.
				if last {
					cur.Off = sr.limit
				} else {
					cur = SpoolCursor{Seq: cur.Seq + 1}
				}
				break
			}
			if err != nil {
				sr.close()
				return nil, cur, fmt.Errorf("spool: %w", err)
			}
			out = append(out, p)
			cur.Off = sr.off
		}
		sr.close()
	}
	return out, cur, nil
}

// Commit records that everything before cur was delivered (n records) and
// deletes segments that are wholly delivered.
func (s *Spool) Commit(cur SpoolCursor, n int) error {
	// A delivered segment that cannot be removed stays on disk (OpenSpool
	// removes it later); the cursor moves past it all the same, so its
	// records are never sent again.
	var rmErr error
	for seq := s.rseq; seq < cur.Seq; seq++ {
		rmErr = errors.Join(rmErr, s.remove(seq))
	}
	s.rseq, s.roff = cur.Seq, cur.Off
	s.depth.Add(-int64(n))
	if s.depth.Load() <= 0 && s.rseq == s.wseq && s.roff == s.wsize && s.wsize > 0 {
		// Everything delivered: writing moves on to a new segment, the
		// cursor moves to its start, durably, and only then is the
		// delivered segment removed. A segment is never written again
		// once delivered, so no cursor can point into records it has not
		// seen. A crash before the new cursor is on disk leaves the one
		// the last Commit wrote, which sends the last batch again; one
		// after it sends nothing again, and the next open removes the
		// delivered segment if it is still there.
		err := s.roll()
		if err == nil {
			s.step("new segment open")
			err = s.writeCursor(s.wseq, 0, true)
		}
		if err == nil {
			s.step("cursor on disk")
			delivered := s.rseq
			s.rseq, s.roff = s.wseq, 0
			return errors.Join(rmErr, s.remove(delivered))
		}
		rmErr = errors.Join(rmErr, err)
	}
	// A cursor that a crash loses only sends delivered records again.
	return errors.Join(rmErr, s.writeCursor(s.rseq, s.roff, false))
}

// remove deletes a delivered segment, taking its bytes off the spool's
// size. One that cannot be removed still counts: it is still on disk.
func (s *Spool) remove(seq uint64) error {
	delete(s.ends, seq)
	st, err := os.Stat(s.path(seq))
	if errors.Is(err, os.ErrNotExist) {
		// Removed by hand: its bytes, still counted, are not on disk.
		s.size.Store(s.sizeOnDisk())
		return nil
	}
	if err := os.Remove(s.path(seq)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("spool: remove delivered segment: %w", err)
	}
	_ = os.Remove(s.path(seq) + endSuffix)
	if err == nil {
		s.size.Add(-st.Size())
	}
	return nil
}

func (s *Spool) step(name string) {
	if s.afterStep != nil {
		s.afterStep(name)
	}
}

// writeCursor replaces the cursor file; durable, it syncs the file and the
// directory before returning.
func (s *Spool) writeCursor(seq uint64, off int64, durable bool) error {
	tmp := filepath.Join(s.dir, cursorFile+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return fmt.Errorf("spool: write cursor: %w", err)
	}
	_, err = fmt.Fprintf(f, "%d %d\n", seq, off)
	if err == nil && durable {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(s.dir, cursorFile))
	}
	if err == nil && durable {
		err = syncDir(s.dir)
	}
	if err != nil {
		return fmt.Errorf("spool: write cursor: %w", err)
	}
	return nil
}

// ID names the spool, whichever host or process opens it: random, made
// when the directory is first used and kept in it, so an edge that comes
// back on the same spool under another host name (a recreated container)
// is known as the same.
func (s *Spool) ID() string { return s.id }

// spoolID reads the spool's id from dir, making one if there is none.
func spoolID(dir string) (string, error) {
	path := filepath.Join(dir, idFile)
	if b, err := os.ReadFile(path); err == nil {
		if id := strings.TrimSpace(string(b)); len(id) == 32 {
			return id, nil
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("spool: read id: %w", err)
	}
	var raw [16]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", fmt.Errorf("spool: make id: %w", err)
	}
	id := hex.EncodeToString(raw[:])
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err == nil {
		_, err = f.WriteString(id + "\n")
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(dir)
	}
	if err != nil {
		return "", fmt.Errorf("spool: write id: %w", err)
	}
	return id, nil
}

// Drained reports whether the read cursor has reached the end of what was
// written: nothing is left to deliver, whatever the record count says
// after a corrupt stretch.
func (s *Spool) Drained() bool { return s.rseq == s.wseq && s.roff >= s.wsize }

// Depth is the number of records not yet delivered.
func (s *Spool) Depth() int64 { return s.depth.Load() }

// Size is how many bytes the spool's files hold on disk.
func (s *Spool) Size() int64 { return s.size.Load() }

// Corrupt is the number of corrupt regions skipped so far. It is safe for
// concurrent use.
func (s *Spool) Corrupt() int64 { return s.corrupt.Load() }

// CorruptBytes is the size of the corrupt regions skipped so far. It is
// safe for concurrent use.
func (s *Spool) CorruptBytes() int64 { return s.corruptBytes.Load() }

// TornTailBytes is how many bytes were cut off the end of the segment being
// written when the spool opened. It is safe for concurrent use.
func (s *Spool) TornTailBytes() int64 { return s.tornBytes.Load() }

// Close closes the current segment.
func (s *Spool) Close() error {
	err := s.w.Close()
	_ = s.lock.Close() // releases the lock
	return err
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}
