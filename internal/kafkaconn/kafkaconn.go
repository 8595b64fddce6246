// Package kafkaconn builds the Kafka clients' connections: TLS and SASL as
// the operator configures them, and, for readers, a connection through which
// a consumer's fetches of many small records cost far fewer system calls and
// timer updates than through kafka-go's own dialer.
package kafkaconn

import (
	"bufio"
	"net"
)

// ReadAheadBytes is how much of a fetch answer one read from the broker's
// connection may take at a time.
const ReadAheadBytes = 256 << 10

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
