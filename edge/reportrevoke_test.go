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
			// One call first, so that the key is in the edge's cache and the
			// check when the next call's head arrives needs no database.
			warm, err := http.NewRequest(http.MethodPost, in.URL+"/v1/events", strings.NewReader(`{"events":[]}`))
			testenv.Must(t, err, "warm-up request")
			warm.Header.Set("Authorization", "Bearer "+key)
			wresp, err := http.DefaultClient.Do(warm)
			testenv.Must(t, err, "warm-up call")
			_, _ = io.Copy(io.Discard, wresp.Body)
			wresp.Body.Close()
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
			time.Sleep(500 * time.Millisecond) // the head's check, from the cache, is done
			_, err = env.Store.RevokeKey(ctx, id, time.Now(), edge.AuditInfo{Actor: "test"})
			testenv.Must(t, err, "revoke")
			env.Settle(t) // every instance has dropped the key from its cache
			// Should the head's check have come after the revocation all the
			// same (a stalled machine), the answer is the same 401, and the
			// edge may have closed the connection: the rest is sent as it
			// can be, and the answer read.
			rest := fmt.Sprintf(`{"id":"after-revoke","type":"tokens","time":%q,"units":5}]}`, time.Now().UTC().Format(time.RFC3339))
			_, _ = fmt.Fprintf(conn, "%x\r\n%s\r\n0\r\n\r\n", len(rest), rest)
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
