package edge_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

// A batch of server-reported usage whose key is revoked while its body is
// still coming is refused once it has come, on both fronts: its events are
// neither emitted nor billed. Before, the net/http handler checked the key
// only when the headers arrived, and accepted the batch.
func TestAReportWhoseKeyIsRevokedMidBodyIsRefused(t *testing.T) {
	ctx := context.Background()
	env := edgetest.New(t)
	for _, fr := range fronts {
		t.Run(fr.name, func(t *testing.T) {
			in := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP})
			key, id := env.Key(t, "acct_report_revoked", edge.Secret, schemas.Live)
			u, err := url.Parse(in.URL)
			testenv.Must(t, err, "edge URL")
			conn, err := net.Dial("tcp", u.Host)
			testenv.Must(t, err, "dial the edge")
			defer conn.Close()
			chunk := func(s string) {
				_, err := fmt.Fprintf(conn, "%x\r\n%s\r\n", len(s), s)
				testenv.Must(t, err, "send a chunk")
			}
			_, err = fmt.Fprintf(conn, "POST /v1/events HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n", u.Host, key)
			testenv.Must(t, err, "send the head")
			chunk(`{"events":[`)
			time.Sleep(200 * time.Millisecond)
			_, err = env.Store.RevokeKey(ctx, id, time.Now(), edge.AuditInfo{Actor: "test"})
			testenv.Must(t, err, "revoke")
			env.Settle(t)
			time.Sleep(1500 * time.Millisecond) // past the second revocation may take
			chunk(fmt.Sprintf(`{"id":"after-revoke","type":"tokens","time":%q,"units":5}]}`, time.Now().UTC().Format(time.RFC3339)))
			_, err = io.WriteString(conn, "0\r\n\r\n")
			testenv.Must(t, err, "end the body")
			testenv.Must(t, conn.SetReadDeadline(time.Now().Add(10*time.Second)), "deadline")
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			testenv.Must(t, err, "read the answer")
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(string(body), "revoked_api_key") {
				t.Fatalf("the report whose key was revoked mid-body: %d %s; want 401 revoked_api_key", resp.StatusCode, body)
			}
		})
	}
}
