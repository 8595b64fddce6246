// Package kafkaconn dials the connections that read from a broker: a
// consumer's fetches of many small records cost far fewer system calls and
// timer updates through it than through kafka-go's own dialer.
package kafkaconn

import (
	"bufio"
	"context"
	"net"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/tollgate-dev/tollgate/internal/deadline"
)

// ReadAheadBytes is how much of a fetch answer one read from the broker's
// connection may take at a time.
const ReadAheadBytes = 256 << 10

// Dialer is a kafka-go dialer for readers. kafka-go's reader moves its
// connection's read deadline for every message of a fetch, to the same
// instant each time (deadline.Lazy keeps those moves from costing a timer
// update each), and reads the connection through a bufio.Reader of 4 KiB,
// so a fetch answer of many small records cost one system call for every
// 4 KiB: about 7 % of the ingest process's CPU on the ingest benchmark.
// Through ReadAhead one read takes what the socket holds, up to
// ReadAheadBytes.
func Dialer(timeout time.Duration) *kafka.Dialer {
	return &kafka.Dialer{
		Timeout: timeout,
		DialFunc: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return ReadAhead(deadline.Lazy(c)), nil
		},
	}
}

// ReadAhead reads c through a buffer of ReadAheadBytes. Deadlines still
// bound every read that has to wait for the broker: a read is served from
// the buffer only when the bytes are already there.
func ReadAhead(c net.Conn) net.Conn {
	return &readAheadConn{Conn: c, r: bufio.NewReaderSize(c, ReadAheadBytes)}
}

type readAheadConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *readAheadConn) Read(p []byte) (int, error) { return c.r.Read(p) }
