// Package procstat reads how much CPU time local processes have used, so a
// benchmark can report the CPU each side of a comparison cost, not only its
// wall time. On a machine whose cores are all busy, throughput follows CPU
// per unit of work, and the wall time alone does not say whose CPU it was.
//
// It reads Linux's /proc; elsewhere every lookup fails and the benchmark
// says the CPU figures are unavailable.
package procstat

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTick is the unit of utime and stime in /proc/<pid>/stat. Linux
// reports them in USER_HZ, which is 100 on every mainstream architecture.
const clockTick = 10 * time.Millisecond

// ListenerPIDs finds the processes listening on the TCP port (a server
// whose workers share one socket, such as nginx, has several), through the
// socket's inode in /proc/net/tcp{,6} and the processes holding it open.
func ListenerPIDs(port int) ([]int, error) {
	inodes := map[string]bool{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			// sl local_address rem_address st ... inode (the 10th field)
			if len(fs) < 10 || fs[3] != "0A" { // 0A: LISTEN
				continue
			}
			i := strings.LastIndexByte(fs[1], ':')
			if i < 0 {
				continue
			}
			if p, err := strconv.ParseInt(fs[1][i+1:], 16, 32); err == nil && int(p) == port {
				inodes[fs[9]] = true
			}
		}
	}
	if len(inodes) == 0 {
		return nil, fmt.Errorf("no listener on port %d in /proc/net/tcp", port)
	}
	seen := map[int]bool{}
	var pids []int
	fds, _ := filepath.Glob("/proc/[0-9]*/fd/*")
	for _, fd := range fds {
		l, err := os.Readlink(fd)
		if err != nil || !strings.HasPrefix(l, "socket:[") {
			continue
		}
		if inodes[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] {
			pid, err := strconv.Atoi(strings.Split(fd, "/")[2])
			if err == nil && !seen[pid] {
				seen[pid] = true
				pids = append(pids, pid)
			}
		}
	}
	if len(pids) == 0 {
		return nil, fmt.Errorf("port %d: no process of this user holds its socket", port)
	}
	return pids, nil
}

// CPU is the user plus system time the process has used so far, all its
// threads together.
func CPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) is in parentheses and may hold spaces;
	// the fields after its closing parenthesis start at field 3 (state).
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("unexpected /proc stat format")
	}
	fs := strings.Fields(string(b[i+1:]))
	if len(fs) < 13 {
		return 0, errors.New("unexpected /proc stat format")
	}
	utime, err1 := strconv.ParseInt(fs[11], 10, 64) // field 14
	stime, err2 := strconv.ParseInt(fs[12], 10, 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("unexpected /proc stat format: %w", err)
	}
	return time.Duration(utime+stime) * clockTick, nil
}

// Self is this process's user plus system time so far.
func Self() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// Meter samples the CPU time of a fixed set of processes.
type Meter struct {
	names []string
	pids  [][]int
}

// Watch adds the processes listening on addr's port (host:port), under
// name. It reports why when they cannot be found (another user's, or in a
// container).
func (m *Meter) Watch(name, addr string) error {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	port, err := strconv.Atoi(p)
	if err != nil {
		return fmt.Errorf("%s: port %q: %w", name, p, err)
	}
	pids, err := ListenerPIDs(port)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	m.names = append(m.names, name)
	m.pids = append(m.pids, pids)
	return nil
}

// Use is the CPU time one watched name's processes used over a span.
type Use struct {
	Name string
	CPU  time.Duration
}

// Span is a starting reading of this process's CPU time and of m's
// processes'; End says what each has used since.
type Span struct {
	m      *Meter
	self   time.Duration
	others []time.Duration
}

// Begin starts a span. A nil Meter watches nothing but this process.
func (m *Meter) Begin() Span { return Span{m: m, self: Self(), others: m.sample()} }

// End is the CPU time this process and each watched name's processes (in
// Watch order) have used since Begin; a process that is gone counts zero.
func (s Span) End() (self time.Duration, others []Use) {
	self = Self() - s.self
	for i, d := range s.m.sample() {
		others = append(others, Use{Name: s.m.names[i], CPU: d - s.others[i]})
	}
	return self, others
}

func (m *Meter) sample() []time.Duration {
	if m == nil {
		return nil
	}
	out := make([]time.Duration, len(m.pids))
	for i, pids := range m.pids {
		for _, pid := range pids {
			d, _ := CPU(pid)
			out[i] += d
		}
	}
	return out
}
