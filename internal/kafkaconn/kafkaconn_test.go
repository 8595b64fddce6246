package kafkaconn_test

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/internal/deadline"
	"github.com/tollgate-dev/tollgate/internal/kafkaconn"
)

// TestReadAheadKeepsTheStreamAndItsDeadlines checks the broker connection's
// read-ahead: what kafka-go reads through its own small buffer is the byte
// stream the broker sent, in order, and a read that has to wait for the
// broker still ends at its deadline.
func TestReadAheadKeepsTheStreamAndItsDeadlines(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// More than the read-ahead buffer, sent in writes of odd sizes.
	want := make([]byte, 3*kafkaconn.ReadAheadBytes+12345)
	for i := range want {
		want[i] = byte(i * 7 % 251)
	}
	sent := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			sent <- err
			return
		}
		defer c.Close()
		for rest := want; len(rest) > 0; {
			n := min(len(rest), 1000+len(rest)%7000)
			if _, err := c.Write(rest[:n]); err != nil {
				sent <- err
				return
			}
			rest = rest[n:]
		}
		sent <- nil
		// Hold the connection open and silent: the last read must end at
		// its deadline.
		time.Sleep(5 * time.Second)
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c := kafkaconn.ReadAhead(deadline.Lazy(raw))
	defer c.Close()
	// kafka-go reads its connection through a 4 KiB bufio.Reader.
	r := bufio.NewReader(c)
	got := make([]byte, len(want))
	if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(r, got); err != nil {
		t.Fatalf("reading the stream: %v", err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Fatalf("the stream read through the read-ahead differs from the one sent at byte %d of %d", i, len(want))
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if err := c.SetReadDeadline(time.Now().Add(200 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	var one [1]byte
	_, err = r.Read(one[:])
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a read of a silent broker ended with %v, want its deadline", err)
	}
}
