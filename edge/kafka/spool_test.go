package kafka

import (
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"hash/crc32"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func recs(from, n int) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		out[i] = []byte(fmt.Sprintf("record-%06d", from+i))
	}
	return out
}

// openSpool opens the spool in dir, failing t if it cannot.
func openSpool(t *testing.T, dir string) *Spool {
	t.Helper()
	s, err := OpenSpool(dir, slog.New(slog.DiscardHandler), 0)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func readAllSpool(t *testing.T, s *Spool) []string {
	t.Helper()
	var out []string
	for {
		rs, cur, err := s.Read(7)
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		if len(rs) == 0 {
			return out
		}
		for _, r := range rs {
			out = append(out, string(r))
		}
		if err := s.Commit(cur, len(rs)); err != nil {
			t.Fatalf("commit: %v", err)
		}
	}
}

func TestSpoolDeliversInOrderAcrossSegmentsAndRestarts(t *testing.T) {
	dir := t.TempDir()
	s := openSpool(t, dir)
	s.maxSeg = 200 // force many segments
	for i := 0; i < 10; i++ {
		if err := s.Append(recs(i*10, 10)); err != nil {
			t.Fatal(err)
		}
	}
	if s.Depth() != 100 {
		t.Fatalf("depth %d, want 100", s.Depth())
	}
	// Deliver 20, then "crash" (reopen without closing cleanly).
	rs, cur, err := s.Read(20)
	if err != nil || len(rs) != 20 {
		t.Fatalf("read 20: %d %v", len(rs), err)
	}
	if err := s.Commit(cur, 20); err != nil {
		t.Fatal(err)
	}
	_ = s.Close()
	s2 := openSpool(t, dir)
	defer s2.Close()
	if s2.Depth() != 80 {
		t.Fatalf("depth after reopen %d, want 80", s2.Depth())
	}
	got := readAllSpool(t, s2)
	if len(got) != 80 || got[0] != "record-000020" || got[79] != "record-000099" {
		t.Fatalf("got %d records, first %q last %q", len(got), got[0], got[len(got)-1])
	}
	for i, r := range got {
		if r != fmt.Sprintf("record-%06d", 20+i) {
			t.Fatalf("record %d is %q: out of order", i, r)
		}
	}
	if s2.Depth() != 0 {
		t.Fatalf("depth %d after draining, want 0", s2.Depth())
	}
	segs, _ := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
	if len(segs) != 1 {
		t.Fatalf("%d segment files left after full delivery, want 1 (the open one)", len(segs))
	}
}

func TestSpoolCutsATornTailAndKeepsEveryWholeRecord(t *testing.T) {
	cases := []struct {
		name string
		tear func(b []byte) []byte
	}{
		{"half-written header is cut", func(b []byte) []byte { return append(b, 0, 0, 0) }},
		{"half-written payload is cut", func(b []byte) []byte { return append(b, 0, 0, 0, 9, 1, 2, 3, 4, 'x') }},
		{"record with a bad checksum is cut", func(b []byte) []byte { return append(b, 0, 0, 0, 1, 9, 9, 9, 9, 'x') }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openSpool(t, dir)
			if err := s.Append(recs(0, 5)); err != nil {
				t.Fatal(err)
			}
			path := s.path(s.wseq)
			_ = s.Close()
			b, _ := os.ReadFile(path)
			if err := os.WriteFile(path, c.tear(b), 0o640); err != nil {
				t.Fatal(err)
			}
			s2 := openSpool(t, dir)
			defer s2.Close()
			if torn := int64(len(c.tear(nil))); s2.TornTailBytes() != torn {
				t.Errorf("%d torn-tail bytes counted, want the %d cut", s2.TornTailBytes(), torn)
			}
			if s2.Depth() != 5 || s2.Corrupt() != 0 {
				t.Fatalf("depth %d and %d corrupt regions, want the 5 whole records and a torn tail, not corruption", s2.Depth(), s2.Corrupt())
			}
			if err := s2.Append(recs(5, 1)); err != nil {
				t.Fatal(err)
			}
			got := readAllSpool(t, s2)
			if len(got) != 6 || got[5] != "record-000005" {
				t.Fatalf("after the cut and one more append: %v", got)
			}
		})
	}
}

// A corrupt record is stepped over to the next whole one, in a delivered
// segment or in the one being written: it costs that record alone, and is
// counted and logged once, however often it is read.
func TestSpoolSkipsACorruptRecordAndDeliversTheRest(t *testing.T) {
	cases := []struct {
		name    string
		seq     uint64 // which segment of six to damage
		corrupt func(b []byte)
	}{
		{"flipped payload byte in an earlier segment", 1, func(b []byte) { b[recordHeader] ^= 0xff }},
		{"length past the segment's end in an earlier segment", 1, func(b []byte) { b[3] ^= 0xff }},
		{"length beyond any record in an earlier segment", 1, func(b []byte) { b[0] ^= 0xff }},
		{"flipped checksum byte in the segment being written", 6, func(b []byte) { b[5] ^= 0xff }},
		{"zeroed record in the segment being written", 6, func(b []byte) { clear(b[:21]) }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openSpool(t, dir)
			s.maxSeg = 200 // each append of ten 21-byte records fills a segment
			for i := range 6 {
				if err := s.Append(recs(i*10, 10)); err != nil {
					t.Fatal(err)
				}
			}
			_ = s.Close()
			// The first record of the damaged segment goes bad.
			path := s.path(c.seq)
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			c.corrupt(b)
			if err := os.WriteFile(path, b, 0o640); err != nil {
				t.Fatal(err)
			}

			logs := &testenv.LogBuffer{}
			s, err = OpenSpool(dir, slog.New(slog.NewTextHandler(logs, nil)), 0)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			lost := int(c.seq-1) * 10
			want := wantStrings(append(recs(0, lost), recs(lost+1, 59-lost)...))
			if s.Depth() != 59 {
				t.Errorf("depth %d at open, want 59", s.Depth())
			}
			if got := readAllSpool(t, s); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("read %v, want %v", got, want)
			}
			if s.Corrupt() != 1 || s.CorruptBytes() != 21 {
				t.Errorf("%d corrupt regions of %d bytes counted, want one of 21", s.Corrupt(), s.CorruptBytes())
			}
			line := fmt.Sprintf("segment=%d offset=0 bytes=21", c.seq)
			if !logs.Contains(line) {
				t.Errorf("no log line with %q", line)
			}
			if !s.Drained() || s.Depth() != 0 {
				t.Errorf("after reading everything: drained %v, depth %d; want drained and 0", s.Drained(), s.Depth())
			}
		})
	}
}

// When the spool empties, a kill -9 at any step of emptying it leaves a
// directory that, opened again, sends at most the last batch again.
func TestSpoolKilledWhileEmptyingResendsAtMostOneBatch(t *testing.T) {
	dir := t.TempDir()
	s := openSpool(t, dir)
	for i := range 50 { // 50 group commits of 100 during an outage
		if err := s.Append(recs(i*100, 100)); err != nil {
			t.Fatal(err)
		}
	}
	// Kafka is back: the spool drains in batches of 1,000.
	for s.Depth() > 1000 {
		rs, cur, err := s.Read(1000)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Commit(cur, len(rs)); err != nil {
			t.Fatal(err)
		}
	}
	last, cur, err := s.Read(1000)
	if err != nil || len(last) != 1000 {
		t.Fatalf("read the last batch: %d records, %v", len(last), err)
	}
	// A copy of the directory at each step is what a kill -9 there leaves.
	type crash struct{ step, dir string }
	var crashes []crash
	at := func(step string) { crashes = append(crashes, crash{step, copyDir(t, dir)}) }
	at("before the last commit")
	s.afterStep = at
	if err := s.Commit(cur, len(last)); err != nil {
		t.Fatal(err)
	}
	at("after the last commit")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if len(crashes) != 4 {
		t.Fatalf("%d crash points, want the two steps of emptying the spool as well", len(crashes))
	}
	for _, c := range crashes {
		t.Run(c.step, func(t *testing.T) {
			s, err := OpenSpool(c.dir, slog.New(slog.DiscardHandler), 0)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			got := readAllSpool(t, s)
			if len(got) != 0 && fmt.Sprint(got) != fmt.Sprint(wantStrings(last)) {
				t.Errorf("sent %d records again, want none or the last batch of %d", len(got), len(last))
			}
			if err := s.Append(recs(9000, 1)); err != nil {
				t.Fatal(err)
			}
			if got := readAllSpool(t, s); fmt.Sprint(got) != "[record-009000]" {
				t.Errorf("a new record reads back as %v", got)
			}
		})
	}
}

// copyDir copies the files of dir to a new directory and returns its path.
func copyDir(t *testing.T, dir string) string {
	t.Helper()
	to := t.TempDir()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	return to
}

func TestSpoolIsLockedToOneProcess(t *testing.T) {
	dir := t.TempDir()
	s := openSpool(t, dir)
	if _, err := OpenSpool(dir, slog.New(slog.DiscardHandler), 0); err == nil {
		t.Fatal("a second open of the same spool succeeded")
	}
	_ = s.Close()
	s2, err := OpenSpool(dir, slog.New(slog.DiscardHandler), 0)
	if err != nil {
		t.Fatalf("reopen after close: %v", err)
	}
	_ = s2.Close()
}

// withoutFreeFileDescriptors runs fn with the process's open-file limit
// lowered below what it holds, so every open fails with EMFILE, as at a
// busy process's limit, and restores the limit after.
func withoutFreeFileDescriptors(t *testing.T, fn func()) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	low := lim
	low.Cur = 3
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatal(err)
		}
	}()
	fn()
}

// A roll that cannot open the next segment leaves the spool writing where
// it was: once files can be opened again, appends succeed, and every
// record appended is read back once.
func TestSpoolTakesAppendsAgainAfterARollFails(t *testing.T) {
	s, err := OpenSpool(t.TempDir(), slog.New(slog.DiscardHandler), 0)
	if err != nil {
		t.Fatal(err)
	}
	s.maxSeg = 100
	if err := s.Append(recs(0, 10)); err != nil { // past maxSeg: the next append rolls
		t.Fatal(err)
	}
	withoutFreeFileDescriptors(t, func() {
		err = s.Append(recs(10, 1))
	})
	if err == nil {
		t.Fatal("an append that had to open a new segment without a free file descriptor succeeded")
	}
	for i := range 3 {
		if err := s.Append(recs(20+i, 1)); err != nil {
			t.Fatalf("append %d once files can be opened again: %v", i, err)
		}
	}
	want := wantStrings(append(recs(0, 10), recs(20, 3)...))
	if got := readAllSpool(t, s); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("read %v, want %v", got, want)
	}
	if !s.Drained() || s.Depth() != 0 {
		t.Errorf("after reading everything: drained %v, depth %d; want drained and 0", s.Drained(), s.Depth())
	}
	if err := s.Append(recs(30, 1)); err != nil {
		t.Fatal(err)
	}
	if got := readAllSpool(t, s); fmt.Sprint(got) != "[record-000030]" {
		t.Errorf("after draining, a new append reads back as %v", got)
	}
	if err := s.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
}

// fsizeChild names the environment variable under which the test binary,
// run again by TestSpoolAppendCutShortByTheDisk, is the child that hits
// the file size limit. The limit is per process, so the child has it alone.
const fsizeChild = "TOLLGATE_SPOOL_FSIZE_CHILD_DIR"

func TestSpoolAppendCutShortByTheDisk(t *testing.T) {
	if dir := os.Getenv(fsizeChild); dir != "" {
		spoolFsizeChild(t, dir)
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestSpoolAppendCutShortByTheDisk$", "-test.v")
	cmd.Env = append(os.Environ(), fsizeChild+"="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS") {
		t.Fatalf("child with a file size limit: %v\n%s", err, out)
	}
	// The child's spool, opened again here, holds exactly what its appends
	// that succeeded wrote, in order.
	s := openSpool(t, dir)
	defer s.Close()
	want := append(recs(0, 3), recs(10, 2)...)
	if got := readAllSpool(t, s); fmt.Sprint(got) != fmt.Sprint(wantStrings(want)) {
		t.Errorf("after restart got %v, want %v", got, wantStrings(want))
	}
}

func wantStrings(rs [][]byte) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = string(r)
	}
	return out
}

// appendCutShort appends five records to s under a file size limit that
// lets the disk take only 20 bytes of them (the write is cut short and
// then refused, as on a full disk), and checks the append failed.
func appendCutShort(t *testing.T, s *Spool) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &lim); err != nil {
		t.Fatal(err)
	}
	small := lim
	small.Cur = uint64(s.wsize) + 20 // less than one more record
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &small); err != nil {
		t.Fatal(err)
	}
	err := s.Append(recs(3, 5))
	if restore := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &lim); restore != nil {
		t.Fatal(restore)
	}
	if err == nil {
		t.Fatal("an append past the file size limit succeeded")
	}
}

// spoolFsizeChild appends, then lets the disk take only part of a batch
// (a file size limit: the write is cut short and then refused, as on a
// full disk), then appends again once the disk takes writes.
func spoolFsizeChild(t *testing.T, dir string) {
	s := openSpool(t, dir)
	if err := s.Append(recs(0, 3)); err != nil {
		t.Fatal(err)
	}
	appendCutShort(t, s)
	if s.Depth() != 3 {
		t.Errorf("depth %d after the failed append, want 3", s.Depth())
	}
	if err := s.Append(recs(10, 2)); err != nil {
		t.Fatalf("append once the disk takes writes: %v", err)
	}
	if s.Depth() != 5 {
		t.Errorf("depth %d, want 5", s.Depth())
	}
	// Read without committing, so the parent finds the same records.
	rs, _, err := s.Read(100)
	if err != nil {
		t.Fatal(err)
	}
	want := wantStrings(append(recs(0, 3), recs(10, 2)...))
	if got := wantStrings(rs); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("read %v, want %v", got, want)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// emptySegmentsChild names the environment variable under which the test
// binary, run again by TestAppendsFailingOnAFullDiskLeaveNoEmptySegments,
// is the child under the file size limit.
const emptySegmentsChild = "TOLLGATE_SPOOL_EMPTY_SEGMENTS_CHILD_DIR"

// Appends retried while the disk is full (the edge retries a second) take
// the one segment they were cut back from again: before, each failed
// append after the first started a new segment and left it empty, an
// empty file a second for as long as the disk stayed full.
func TestAppendsFailingOnAFullDiskLeaveNoEmptySegments(t *testing.T) {
	if dir := os.Getenv(emptySegmentsChild); dir != "" {
		s := openSpool(t, dir)
		if err := s.Append(recs(0, 3)); err != nil {
			t.Fatal(err)
		}
		for range 6 {
			appendCutShort(t, s)
		}
		if err := s.Append(recs(10, 2)); err != nil {
			t.Fatalf("append once the disk takes writes: %v", err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestAppendsFailingOnAFullDiskLeaveNoEmptySegments$", "-test.v")
	cmd.Env = append(os.Environ(), emptySegmentsChild+"="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS") {
		t.Fatalf("child with a file size limit: %v\n%s", err, out)
	}
	ents, err := os.ReadDir(dir)
	testenv.Must(t, err, "list the spool")
	var segs []string
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), segSuffix) {
			segs = append(segs, e.Name())
		}
	}
	// The first segment's three records, and one segment for what came
	// after the first failure.
	if len(segs) != 2 {
		t.Errorf("%d segments after six failed appends, want 2: %v", len(segs), segs)
	}
	s := openSpool(t, dir)
	defer s.Close()
	want := append(recs(0, 3), recs(10, 2)...)
	if got := readAllSpool(t, s); fmt.Sprint(got) != fmt.Sprint(wantStrings(want)) {
		t.Errorf("after restart got %v, want %v", got, wantStrings(want))
	}
}

// A spool keeps one id for its life, whichever process or host opens it:
// the edge's hold on billing is named by it.
func TestSpoolIDOutlivesTheProcess(t *testing.T) {
	dir := t.TempDir()
	s := openSpool(t, dir)
	id := s.ID()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	again := openSpool(t, dir)
	defer again.Close()
	other, err := OpenSpool(t.TempDir(), slog.New(slog.DiscardHandler), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if len(id) != 32 || again.ID() != id || other.ID() == id {
		t.Errorf("ids %q, then %q; another spool %q: want one id per spool, kept", id, again.ID(), other.ID())
	}
}

// spoolFiles is what the spool's segment files in dir hold.
func spoolFiles(t *testing.T, dir string) int64 {
	t.Helper()
	segs, err := filepath.Glob(filepath.Join(dir, "*"+segSuffix))
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, p := range segs {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		n += st.Size()
	}
	return n
}

// A bounded spool refuses an append that would take its files past the
// bound, as a full disk would, and takes appends again once delivered
// segments are gone; a reopened spool knows what its files hold.
func TestSpoolKeepsItsFilesWithinItsBound(t *testing.T) {
	dir := t.TempDir()
	const bound = 1000 // a batch of ten 13-byte records takes 210 bytes
	open := func() *Spool {
		s, err := OpenSpool(dir, slog.New(slog.DiscardHandler), bound)
		if err != nil {
			t.Fatal(err)
		}
		s.maxSeg = 200 // a segment per batch
		return s
	}
	check := func(s *Spool, want int64) {
		t.Helper()
		if s.Size() != want || spoolFiles(t, dir) != want {
			t.Fatalf("Size %d, files %d; want %d", s.Size(), spoolFiles(t, dir), want)
		}
	}
	s := open()
	for i := 0; i < 4; i++ {
		if err := s.Append(recs(i*10, 10)); err != nil {
			t.Fatalf("append %d: %v", i, err)
		}
	}
	check(s, 840)
	if err := s.Append(recs(40, 10)); !errors.Is(err, ErrSpoolFull) {
		t.Fatalf("append past the bound: %v, want ErrSpoolFull", err)
	}
	check(s, 840)
	if s.Depth() != 40 {
		t.Fatalf("depth %d, want 40", s.Depth())
	}
	_ = s.Close()
	s = open()
	defer func() { _ = s.Close() }()
	check(s, 840)
	if err := s.Append(recs(40, 10)); !errors.Is(err, ErrSpoolFull) {
		t.Fatalf("append past the bound after a reopen: %v, want ErrSpoolFull", err)
	}
	// Twenty records delivered: the first segment is wholly delivered and
	// removed, which makes room for one more batch.
	rs, cur, err := s.Read(20)
	if err != nil || len(rs) != 20 {
		t.Fatalf("read 20: %d %v", len(rs), err)
	}
	if err := s.Commit(cur, 20); err != nil {
		t.Fatal(err)
	}
	check(s, 630)
	if err := s.Append(recs(40, 10)); err != nil {
		t.Fatalf("append once a segment is delivered: %v", err)
	}
	if err := s.Append(recs(50, 10)); !errors.Is(err, ErrSpoolFull) {
		t.Fatalf("append past the bound again: %v, want ErrSpoolFull", err)
	}
	got := readAllSpool(t, s)
	if len(got) != 30 || got[0] != "record-000020" || got[29] != "record-000049" {
		t.Fatalf("got %d records, first %q last %q; want 20..49", len(got), got[0], got[len(got)-1])
	}
	check(s, 0)
}

// cutFailsChild names the environment variable under which the test
// binary, run again by TestSpoolCountsWhatAFailedCutLeaves, is the child
// that hits the file size limit.
const cutFailsChild = "TOLLGATE_SPOOL_CUT_FAILS_CHILD_DIR"

// An append the disk cuts short, whose cut back to the last whole record
// then fails too, leaves bytes on disk past it: they count against the
// bound until their segment is delivered and removed.
func TestSpoolCountsWhatAFailedCutLeaves(t *testing.T) {
	dir := os.Getenv(cutFailsChild)
	if dir == "" {
		dir = t.TempDir()
		cmd := exec.Command(os.Args[0], "-test.run=^TestSpoolCountsWhatAFailedCutLeaves$", "-test.v")
		cmd.Env = append(os.Environ(), cutFailsChild+"="+dir)
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--- PASS") {
			t.Fatalf("child with a file size limit: %v\n%s", err, out)
		}
		return
	}
	s, err := OpenSpool(dir, slog.New(slog.DiscardHandler), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = s.Close() }()
	if err := s.Append(recs(0, 3)); err != nil {
		t.Fatal(err)
	}
	before := s.Size()
	s.cut = func(*os.File, int64) error { return errors.New("cut refused") }
	appendCutShort(t, s)
	if files := spoolFiles(t, dir); files != before+20 {
		t.Fatalf("the files hold %d bytes, want the %d before and the 20 the disk took", files, before)
	}
	if s.Size() != spoolFiles(t, dir) {
		t.Errorf("after a failed cut: Size %d, the files hold %d", s.Size(), spoolFiles(t, dir))
	}
	if err := s.Append(recs(10, 2)); err != nil {
		t.Fatalf("append once the disk takes writes: %v", err)
	}
	if s.Size() != spoolFiles(t, dir) {
		t.Errorf("after the next append: Size %d, the files hold %d", s.Size(), spoolFiles(t, dir))
	}
	want := wantStrings(append(recs(0, 3), recs(10, 2)...))
	if got := readAllSpool(t, s); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("read %v, want %v", got, want)
	}
	if s.Size() != 0 || spoolFiles(t, dir) != 0 {
		t.Errorf("once everything is delivered: Size %d, the files hold %d; want 0", s.Size(), spoolFiles(t, dir))
	}
}

// A delivered segment that a reopened spool cannot remove is still on
// disk, and counts against the bound.
func TestSpoolCountsADeliveredSegmentItCannotRemove(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenSpool(dir, slog.New(slog.DiscardHandler), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	s.maxSeg = 200 // a segment per batch
	for i := range 3 {
		if err := s.Append(recs(i*10, 10)); err != nil {
			t.Fatal(err)
		}
	}
	first := s.rseq
	rs, cur, err := s.Read(11) // past the first segment
	if err != nil || len(rs) != 11 {
		t.Fatalf("read 11: %d %v", len(rs), err)
	}
	if err := s.Commit(cur, 11); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Something in the delivered segment's place that cannot be removed:
	// a directory that is not empty (root may remove a read-only file).
	if err := os.MkdirAll(filepath.Join(s.path(first), "pinned"), 0o750); err != nil {
		t.Fatal(err)
	}
	s, err = OpenSpool(dir, slog.New(slog.DiscardHandler), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = s.Close() }()
	st, err := os.Stat(s.path(first))
	if err != nil {
		t.Fatalf("the pinned segment: %v", err)
	}
	if s.Size() != spoolFiles(t, dir) || s.Size() != 420+st.Size() {
		t.Errorf("Size %d, the files hold %d; want the two segments still pending, 420 bytes, and the pinned one's %d",
			s.Size(), spoolFiles(t, dir), st.Size())
	}
	if got := readAllSpool(t, s); len(got) != 19 || got[0] != "record-000011" {
		t.Errorf("read %d records from %v; want 19 from record-000011", len(got), got)
	}
}

// An append the disk cuts short can leave whole records of the batch past
// the last counted one (the disk took two whole records and part of a
// third); when the cut back fails too, the append's retry writes them
// again in the next segment. Each is read once: reading the first segment
// to its end sent them twice, and counted them off the depth twice, which
// went below zero and left later records unsent.
func TestSpoolReadsPastAFailedCutOnlyWhatWasCounted(t *testing.T) {
	dir := t.TempDir()
	s := openSpool(t, dir)
	defer func() { _ = s.Close() }()
	if err := s.Append(recs(0, 3)); err != nil {
		t.Fatal(err)
	}
	// What a short write of recs(3, 5) leaves, then a failed cut.
	failWriteAndCut(t, s, 3)
	if err := s.Append(recs(3, 5)); err != nil {
		t.Fatalf("the append's retry: %v", err)
	}
	if d := s.Depth(); d != 8 {
		t.Fatalf("depth %d, want the 8 records appended", d)
	}
	want := wantStrings(append(recs(0, 3), recs(3, 5)...))
	if got := readAllSpool(t, s); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("read %v, want %v", got, want)
	}
	if d := s.Depth(); d != 0 {
		t.Errorf("depth %d once everything is delivered, want 0", d)
	}
}

// failWriteAndCut leaves in s's segment what a short write of recs(from,
// 2+1) leaves, two whole records and 8 bytes of the third, then a failed
// cut, as undo meets them.
func failWriteAndCut(t *testing.T, s *Spool, from int) {
	t.Helper()
	var partial []byte
	for _, r := range recs(from, 2) {
		partial = binary.BigEndian.AppendUint32(partial, uint32(len(r)))
		partial = binary.BigEndian.AppendUint32(partial, crc32.Checksum(r, castagnoli))
		partial = append(partial, r...)
	}
	partial = append(partial, 0, 0, 0, 13, 1, 2, 3, 4)
	if _, err := s.w.Write(partial); err != nil {
		t.Fatal(err)
	}
	s.cut = func(*os.File, int64) error { return errors.New("cut refused") }
	s.undo()
	s.cut = nil
}

// A restart after a failed cut reads the segment up to its mark: what the
// failed append left past it is neither sent again nor reported corrupt.
// Before, it was read whole, and the append's whole records went out twice
// (out of order) and its torn end was logged as lost events.
func TestARestartAfterAFailedCutReadsOnlyWhatWasCounted(t *testing.T) {
	dir := t.TempDir()
	s := openSpool(t, dir)
	if err := s.Append(recs(0, 3)); err != nil {
		t.Fatal(err)
	}
	failWriteAndCut(t, s, 3)
	if err := s.Append(recs(3, 5)); err != nil {
		t.Fatalf("the append's retry: %v", err)
	}
	testenv.Must(t, s.Close(), "close")
	s2 := openSpool(t, dir)
	defer func() { _ = s2.Close() }()
	if s2.Depth() != 8 || s2.Corrupt() != 0 {
		t.Fatalf("after a restart: depth %d, %d corrupt regions; want the 8 records appended, none", s2.Depth(), s2.Corrupt())
	}
	want := wantStrings(append(recs(0, 3), recs(3, 5)...))
	if got := readAllSpool(t, s2); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("read %v, want %v", got, want)
	}
	if marks, _ := filepath.Glob(filepath.Join(dir, "*"+endSuffix)); len(marks) != 0 {
		t.Errorf("end marks %v left once their segments were delivered", marks)
	}
}

// A stop right after a failed cut, before any append started the next
// segment, keeps the failed append's whole records (its retry went with
// the process) and drops its mark: records appended to that segment from
// then on are read after the next restart too.
func TestAnEndMarkOfTheSegmentBeingWrittenGoesAtTheNextStart(t *testing.T) {
	dir := t.TempDir()
	s := openSpool(t, dir)
	if err := s.Append(recs(0, 3)); err != nil {
		t.Fatal(err)
	}
	failWriteAndCut(t, s, 3)
	testenv.Must(t, s.Close(), "close")
	s2 := openSpool(t, dir)
	if s2.Depth() != 5 {
		t.Fatalf("after a restart: depth %d, want the 3 records appended and the failed append's 2 whole ones", s2.Depth())
	}
	if err := s2.Append(recs(5, 4)); err != nil {
		t.Fatal(err)
	}
	s2.maxSeg = 1 // the next append starts a segment: this one is read by its mark, if it has one
	if err := s2.Append(recs(9, 1)); err != nil {
		t.Fatal(err)
	}
	testenv.Must(t, s2.Close(), "close")
	s3 := openSpool(t, dir)
	defer func() { _ = s3.Close() }()
	want := wantStrings(recs(0, 10))
	if got := readAllSpool(t, s3); fmt.Sprint(got) != fmt.Sprint(want) || s3.Corrupt() != 0 {
		t.Errorf("read %v (%d corrupt regions), want %v and none", got, s3.Corrupt(), want)
	}
}

// A kill -9 between a drain's new cursor and its removal of the delivered
// segment, then the empty new segment removed by hand, left the cursor past
// every segment: writing went on below it, and new records were never
// read. Writing now goes on at the cursor's segment.
func TestASpoolWhoseCursorIsPastItsSegmentsReadsWhatItTakes(t *testing.T) {
	dir := t.TempDir()
	s := openSpool(t, dir)
	if err := s.Append(recs(0, 10)); err != nil {
		t.Fatal(err)
	}
	rs, cur, err := s.Read(10)
	if err != nil || len(rs) != 10 {
		t.Fatalf("read: %d records, %v", len(rs), err)
	}
	var crashed string
	s.afterStep = func(step string) {
		if step == "cursor on disk" {
			crashed = copyDir(t, dir)
		}
	}
	if err := s.Commit(cur, len(rs)); err != nil {
		t.Fatal(err)
	}
	testenv.Must(t, s.Close(), "close the spool")
	if crashed == "" {
		t.Fatal("no copy at the cursor on disk step")
	}
	newest := filepath.Join(crashed, fmt.Sprintf("%016d%s", 2, segSuffix))
	if st, err := os.Stat(newest); err != nil || st.Size() != 0 {
		t.Fatalf("the new segment: %v, %v; want it empty", st, err)
	}
	testenv.Must(t, os.Remove(newest), "remove the empty new segment")
	s = openSpool(t, crashed)
	defer s.Close()
	if err := s.Append(recs(100, 5)); err != nil {
		t.Fatal(err)
	}
	if got := readAllSpool(t, s); fmt.Sprint(got) != fmt.Sprint(wantStrings(recs(100, 5))) {
		t.Fatalf("after the restart, the spool reads back %v", got)
	}
}

// A segment being written that is removed by hand takes its records with
// it, and only those: the next append starts a new segment, whose records
// are read.
func TestASpoolSegmentRemovedWhileWrittenLosesOnlyItsRecords(t *testing.T) {
	dir := t.TempDir()
	s := openSpool(t, dir)
	defer s.Close()
	if err := s.Append(recs(0, 10)); err != nil {
		t.Fatal(err)
	}
	testenv.Must(t, os.Remove(s.path(s.wseq)), "remove the segment being written")
	if err := s.Append(recs(10, 10)); err != nil {
		t.Fatal(err)
	}
	if got := readAllSpool(t, s); fmt.Sprint(got) != fmt.Sprint(wantStrings(recs(10, 10))) {
		t.Fatalf("the spool reads back %v, want the 10 records appended after the removal", got)
	}
}

// A full spool whose segments are removed by hand (to free the disk) takes
// appends again: its size is what is on disk, not what the removed files
// held. Before, the removed bytes stayed counted against spool_max_bytes
// until a restart, and every append was refused.
func TestAFullSpoolWhoseSegmentsAreRemovedTakesAppendsAgain(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenSpool(dir, slog.New(slog.DiscardHandler), 2000)
	testenv.Must(t, err, "open the spool")
	defer s.Close()
	s.maxSeg = 600 // several segments
	n := 0
	for ; ; n += 10 {
		err := s.Append(recs(n, 10))
		if errors.Is(err, ErrSpoolFull) {
			break
		}
		testenv.Must(t, err, "fill the spool")
	}
	segs, err := s.segments()
	testenv.Must(t, err, "list segments")
	if len(segs) < 3 {
		t.Fatalf("%d segments, want several", len(segs))
	}
	// The older ones go: the spool takes appends again at once.
	for _, seq := range segs[:len(segs)-1] {
		testenv.Must(t, os.Remove(s.path(seq)), "remove an older segment")
	}
	testenv.Must(t, s.Append(recs(1000, 10)), "append after the older segments' removal")
	// Then the one being written goes too, holding records: with segments
	// this large, the refusal below comes without a move to a new one.
	s.maxSeg = 1 << 20
	n = 0
	for ; ; n += 10 {
		err := s.Append(recs(2000+n, 10))
		if errors.Is(err, ErrSpoolFull) {
			break
		}
		testenv.Must(t, err, "fill the spool again")
	}
	testenv.Must(t, os.Remove(s.path(s.wseq)), "remove the segment being written")
	testenv.Must(t, s.Append(recs(1000, 10)), "append after the removal")
	got := readAllSpool(t, s)
	if len(got) == 0 || got[len(got)-1] != "record-001009" {
		t.Fatalf("the spool reads back %d records ending %v, want the new ones last", len(got), got[max(0, len(got)-1):])
	}
	if s.Size() != spoolFiles(t, dir) {
		t.Fatalf("the spool counts %d bytes, %d are on disk", s.Size(), spoolFiles(t, dir))
	}
}
