package edge_test

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tollgate-dev/tollgate/edge"
	"github.com/tollgate-dev/tollgate/internal/edgetest"
	"github.com/tollgate-dev/tollgate/internal/testenv"
	"github.com/tollgate-dev/tollgate/schemas"
)

const adminToken = "admin-token-for-tests-only"

type adminClient struct {
	t   *testing.T
	url string
}

func (a adminClient) call(method, path, token, body string, out any) int {
	a.t.Helper()
	req, _ := http.NewRequest(method, a.url+path, strings.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	testenv.Must(a.t, err, method+" "+path)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if strings.Contains(string(b), `"hash"`) {
		a.t.Fatalf("%s %s leaked a key hash: %s", method, path, b)
	}
	if out != nil {
		testenv.Must(a.t, json.Unmarshal(b, out), "decode "+string(b))
	}
	return resp.StatusCode
}

func startAdmin(t *testing.T, env *edgetest.Env, audit edge.Auditor) adminClient {
	sum := sha256.Sum256([]byte(adminToken))
	a, err := edge.NewAdmin(hex.EncodeToString(sum[:]), edge.AdminDeps{Store: env.Store, Auditor: audit})
	testenv.Must(t, err, "new admin")
	s := httptest.NewServer(a)
	t.Cleanup(s.Close)
	return adminClient{t: t, url: s.URL}
}

func TestAdminKeyLifecycle(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	admin := startAdmin(t, env, in.Audit)

	var errBody struct{ Error edge.APIError }
	if s := admin.call("GET", "/admin/v1/accounts/acct_adm/keys", "wrong", "", &errBody); s != 401 || errBody.Error.Code != "invalid_admin_token" {
		t.Fatalf("wrong admin token: %d %+v", s, errBody.Error)
	}
	if s := admin.call("PUT", "/admin/v1/accounts/acct_adm", adminToken, `{"name":"Admin Co"}`, nil); s != 200 {
		t.Fatalf("put account: %d", s)
	}
	testenv.Must(t, env.Store.EnsureSubscription(context.Background(), "acct_adm", "enterprise"), "subscribe")
	var created edge.CreatedKey
	if s := admin.call("POST", "/admin/v1/accounts/acct_adm/keys", adminToken, `{"kind":"secret","environment":"live","name":"ci"}`, &created); s != 201 {
		t.Fatalf("create: %d", s)
	}
	if !strings.HasPrefix(created.Secret, "sk_live_") || !strings.HasPrefix(created.Secret, created.Key.DisplayPrefix) || created.Key.Status != "active" {
		t.Fatalf("created %+v", created)
	}
	if s := admin.call("POST", "/admin/v1/accounts/acct_adm/keys", adminToken, `{"kind":"publishable","scopes":["widgets:write"]}`, &errBody); s != 400 {
		t.Fatalf("publishable key with a write scope: %d, want 400", s)
	}
	// Account ids and scopes go to the upstream in headers: nothing that
	// could split a header line gets in.
	for _, bad := range []string{"acct%0D%0AX-Evil:%201", "acct%20x", strings.Repeat("a", 65), "acct@example.com"} {
		if s := admin.call("PUT", "/admin/v1/accounts/"+bad, adminToken, `{}`, &errBody); s != 400 || errBody.Error.Code != "invalid_request" {
			t.Fatalf("account id %q: %d %q, want 400 invalid_request", bad, s, errBody.Error.Code)
		}
	}
	// An empty list asks for a key that can do nothing; a key without
	// scopes can do everything, so it is refused rather than read as that.
	if s := admin.call("POST", "/admin/v1/accounts/acct_adm/keys", adminToken, `{"kind":"secret","scopes":[]}`, &errBody); s != 400 || errBody.Error.Code != "invalid_request" {
		t.Fatalf("scopes []: %d %q, want 400 invalid_request", s, errBody.Error.Code)
	}
	// A key created without scopes is listed with what it grants.
	if got := created.Key.Scopes; !slices.Equal(got, []string{"*"}) {
		t.Fatalf("a secret key created without scopes is shown with scopes %q, want [*]", got)
	}
	for _, bad := range []string{`"a\r\nX-Evil: 1"`, `"a b"`, `"a,b"`, `""`} {
		if s := admin.call("POST", "/admin/v1/accounts/acct_adm/keys", adminToken, `{"scopes":[`+bad+`]}`, &errBody); s != 400 {
			t.Fatalf("scope %s: %d, want 400", bad, s)
		}
	}
	// The body is JSON or refused, never read as nothing: a form (curl -d
	// without a content type) or a misspelt field once made a secret key
	// with every scope out of a request for a narrow publishable one.
	before := adminKeys(t, admin)
	form, _ := http.NewRequest("POST", admin.url+"/admin/v1/accounts/acct_adm/keys",
		strings.NewReader(`{"kind":"publishable","environment":"test","scopes":["widgets:read"]}`))
	form.Header.Set("Authorization", "Bearer "+adminToken)
	form.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := http.DefaultClient.Do(form)
	testenv.Must(t, err, "post a form")
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnsupportedMediaType {
		t.Errorf("a key request sent as a form: %d, want 415", resp.StatusCode)
	}
	for _, body := range []string{`{"kind":"publishable","scope":["widgets:read"]}`, `{"kind":"publishable"} {"kind":"secret"}`, `{"kind":`,
		`{"kind":"publishable"}}`, `{"kind":"publishable"} ]`} { // a brace or bracket after the object once passed
		if s := admin.call("POST", "/admin/v1/accounts/acct_adm/keys", adminToken, body, &errBody); s != 400 || errBody.Error.Code != "invalid_json" {
			t.Errorf("key request %s: %d %q, want 400 invalid_json", body, s, errBody.Error.Code)
		}
	}
	if after := adminKeys(t, admin); after != before {
		t.Errorf("refused key requests made keys: %d before, %d after", before, after)
	}
	if s := admin.call("POST", "/admin/v1/accounts/nobody/keys", adminToken, `{}`, &errBody); s != 404 {
		t.Fatalf("key for a missing account: %d, want 404", s)
	}
	if r := edgetest.Do(t, "GET", in.URL+"/v1/x", created.Secret, nil); r.Status != 200 {
		t.Fatalf("new key: %d", r.Status)
	}

	// Roll with a short overlap: both keys work, then the old one expires.
	var rolled edge.CreatedKey
	if s := admin.call("POST", "/admin/v1/keys/"+created.Key.ID+"/roll", adminToken, `{"overlap":"1500ms"}`, &rolled); s != 201 {
		t.Fatalf("roll: %d", s)
	}
	if rolled.Previous == nil || rolled.Previous.ExpiresAt == nil || rolled.Key.RolledFrom != created.Key.ID {
		t.Fatalf("rolled %+v", rolled)
	}
	if d := time.Until(*rolled.Previous.ExpiresAt); d <= 0 || d > 1500*time.Millisecond {
		t.Fatalf("old key expires in %s, want within 1.5s", d)
	}
	for _, k := range []string{created.Secret, rolled.Secret} {
		if r := edgetest.Do(t, "GET", in.URL+"/v1/x", k, nil); r.Status != 200 {
			t.Fatalf("during the overlap: %d %s", r.Status, r.Body)
		}
	}
	testenv.Wait(t, 5*time.Second, "old key to expire", func() bool {
		return edgetest.Do(t, "GET", in.URL+"/v1/x", created.Secret, nil).Error.Code == "expired_api_key"
	})
	if r := edgetest.Do(t, "GET", in.URL+"/v1/x", rolled.Secret, nil); r.Status != 200 {
		t.Fatalf("new key after the overlap: %d %s %v", r.Status, r.Body, r.Header)
	}

	// Default overlap is 24 hours.
	var rolled2 edge.CreatedKey
	if s := admin.call("POST", "/admin/v1/keys/"+rolled.Key.ID+"/roll", adminToken, "", &rolled2); s != 201 {
		t.Fatalf("roll with default overlap: %d", s)
	}
	if d := time.Until(*rolled2.Previous.ExpiresAt); d < 23*time.Hour+59*time.Minute || d > 24*time.Hour {
		t.Fatalf("default overlap leaves %s, want 24h", d)
	}
	if rolled2.Key.ExpiresAt != nil {
		t.Fatalf("the replacement of a key without expiry expires at %s", rolled2.Key.ExpiresAt)
	}
	// A key in its overlap was already rolled: rolling it again would give
	// a third key the overlap's deadline. It is refused; roll the
	// replacement instead.
	var again map[string]any
	if s := admin.call("POST", "/admin/v1/keys/"+rolled.Key.ID+"/roll", adminToken, "", &again); s != 409 {
		t.Fatalf("second roll of one key: %d %v, want 409", s, again)
	}

	// Revoke takes effect at once.
	var revoked edge.KeyView
	if s := admin.call("POST", "/admin/v1/keys/"+rolled2.Key.ID+"/revoke", adminToken, `{"reason":"leaked in a log"}`, &revoked); s != 200 || revoked.Status != "revoked" {
		t.Fatalf("revoke: %d %+v", s, revoked)
	}
	testenv.Wait(t, time.Second, "revoked key refused", func() bool {
		return edgetest.Do(t, "GET", in.URL+"/v1/x", rolled2.Secret, nil).Error.Code == "revoked_api_key"
	})
	// Revoking it again keeps the first revocation, and audits no second
	// one (the rows below hold one key.revoked).
	var reRevoked edge.KeyView
	if s := admin.call("POST", "/admin/v1/keys/"+rolled2.Key.ID+"/revoke", adminToken, `{"reason":"again"}`, &reRevoked); s != 200 || reRevoked.RevokedAt == nil || !reRevoked.RevokedAt.Equal(*revoked.RevokedAt) {
		t.Fatalf("revoke again: %d %+v; want the first revocation's time", s, reRevoked)
	}

	// List: every key, never a secret.
	var list struct {
		Keys []map[string]any `json:"keys"`
	}
	if s := admin.call("GET", "/admin/v1/accounts/acct_adm/keys", adminToken, "", &list); s != 200 || len(list.Keys) != 3 {
		t.Fatalf("list: %d, %d keys", s, len(list.Keys))
	}
	for _, k := range list.Keys {
		if _, ok := k["secret"]; ok {
			t.Fatalf("list shows a secret: %v", k)
		}
	}

	// Audit: every key event, and the failed admin login.
	in.Audit.Flush(context.Background())
	rows, err := env.PG.Pool.Query(context.Background(), `SELECT action, coalesce(key_id, ''), coalesce(key_prefix, ''), coalesce(reason, ''), coalesce(remote_addr, '')
		FROM audit_log ORDER BY id`)
	testenv.Must(t, err, "audit")
	var got []string
	for rows.Next() {
		var action, keyID, prefix, reason, remote string
		testenv.Must(t, rows.Scan(&action, &keyID, &prefix, &reason, &remote), "scan")
		if remote == "" && action != edge.ActionKeyCreated {
			t.Errorf("audit %s without remote address", action)
		}
		got = append(got, action+" "+keyID)
	}
	want := []string{
		edge.ActionKeyCreated + " " + created.Key.ID,
		edge.ActionKeyRolled + " " + created.Key.ID,
		edge.ActionKeyCreated + " " + rolled.Key.ID,
		edge.ActionKeyRolled + " " + rolled.Key.ID,
		edge.ActionKeyCreated + " " + rolled2.Key.ID,
		edge.ActionKeyRevoked + " " + rolled2.Key.ID,
	}
	if fmt.Sprint(filterKeyEvents(got)) != fmt.Sprint(want) {
		t.Fatalf("key audit rows\n got %v\nwant %v", filterKeyEvents(got), want)
	}
	if !contains(got, edge.ActionAdminAuth+" ") {
		t.Fatalf("no audit row for the failed admin authentication: %v", got)
	}
}

// A roll with an overlap of 0s ends the old key at once, on every edge
// whatever its clock: it is revoked, not set to expire now, which an edge
// whose clock runs behind read as still in force for the difference.
func TestAdminAnswersAWrongMethodWith405(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	admin := startAdmin(t, env, in.Audit)
	for path, allow := range map[string]string{
		"/admin/v1/accounts/acct_m": "PUT", "/admin/v1/accounts/acct_m/keys": "GET, POST", "/admin/v1/keys/key_m": "GET",
		"/admin/v1/keys/key_m/roll": "POST", "/admin/v1/keys/key_m/revoke": "POST", "/healthz": "GET", "/readyz": "GET",
	} {
		edgetest.CheckOtherMethods(t, admin.url+path, adminToken, allow)
	}
	var errBody struct{ Error edge.APIError }
	if s := admin.call("DELETE", "/admin/v1/keys/key_m", "wrong", "", &errBody); s != 401 || errBody.Error.Code != "invalid_admin_token" {
		t.Fatalf("a wrong method with a wrong token: %d %+v, want the token refused first", s, errBody.Error)
	}
}

func TestARollWithoutOverlapEndsTheOldKeyEverywhere(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	// An edge whose clock is a minute behind the admin's.
	behind := env.Start(t, edgetest.Options{Now: func() time.Time { return time.Now().Add(-time.Minute) }})
	admin := startAdmin(t, env, in.Audit)
	key, id := env.Key(t, "acct_roll0", edge.Secret, schemas.Live)
	for _, e := range []*edgetest.Instance{in, behind} {
		if r := edgetest.Do(t, "GET", e.URL+"/v1/x", key, nil); r.Status != 200 {
			t.Fatalf("before the roll: %d", r.Status)
		}
	}
	var rolled edge.CreatedKey
	if s := admin.call("POST", "/admin/v1/keys/"+id+"/roll", adminToken, `{"overlap":"0s"}`, &rolled); s != 201 {
		t.Fatalf("roll: %d", s)
	}
	if rolled.Previous == nil || rolled.Previous.Status != "revoked" {
		t.Fatalf("the rolled key %+v, want revoked", rolled.Previous)
	}
	for _, e := range []*edgetest.Instance{in, behind} {
		testenv.Wait(t, 2*time.Second, "the old key refused", func() bool {
			return edgetest.Do(t, "GET", e.URL+"/v1/x", key, nil).Error.Code == "revoked_api_key"
		})
		if r := edgetest.Do(t, "GET", e.URL+"/v1/x", rolled.Secret, nil); r.Status != 200 {
			t.Fatalf("the new key: %d", r.Status)
		}
	}
}

// Two rolls of one key at once make one replacement, and the other is told
// why (409), not that the key does not exist (a 404 it got when the
// replacement revoked the key under it). A key whose replacement was
// revoked is still rolled once, and the 409 says to create a key instead.
// An overlap of a moment is refused: it is an expiry now, which an edge
// whose clock is behind keeps serving.
func TestRollRacesAndRevokedReplacements(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	admin := startAdmin(t, env, in.Audit)
	for round := range 5 {
		_, id := env.Key(t, "acct_rollrace", edge.Secret, schemas.Live)
		statuses := make([]int, 2)
		var wg sync.WaitGroup
		for i := range statuses {
			wg.Go(func() {
				var out map[string]any
				statuses[i] = admin.call("POST", "/admin/v1/keys/"+id+"/roll", adminToken, `{"overlap":"0s"}`, &out)
			})
		}
		wg.Wait()
		slices.Sort(statuses)
		if !slices.Equal(statuses, []int{201, 409}) {
			t.Fatalf("round %d: two rolls at once answered %v, want one 201 and one 409", round, statuses)
		}
	}

	_, id := env.Key(t, "acct_rollrace", edge.Secret, schemas.Live)
	var errBody struct{ Error edge.APIError }
	for _, moment := range []string{"1ns", "1ms", "999ms"} {
		if s := admin.call("POST", "/admin/v1/keys/"+id+"/roll", adminToken, `{"overlap":"`+moment+`"}`, &errBody); s != 400 || errBody.Error.Code != "invalid_request" {
			t.Fatalf("overlap %s: %d %+v, want 400 invalid_request", moment, s, errBody.Error)
		}
	}
	var first edge.CreatedKey
	if s := admin.call("POST", "/admin/v1/keys/"+id+"/roll", adminToken, `{"overlap":"1h"}`, &first); s != 201 {
		t.Fatalf("roll: %d", s)
	}
	if s := admin.call("POST", "/admin/v1/keys/"+id+"/roll", adminToken, `{"overlap":"1h"}`, &errBody); s != 409 {
		t.Fatalf("roll of a key rolled already: %d, want 409", s)
	}
	if s := admin.call("POST", "/admin/v1/keys/"+first.Key.ID+"/revoke", adminToken, `{"reason":"sent to the wrong team"}`, nil); s != 200 {
		t.Fatalf("revoke the replacement: %d", s)
	}
	if s := admin.call("POST", "/admin/v1/keys/"+id+"/roll", adminToken, `{"overlap":"1h"}`, &errBody); s != 409 || !strings.Contains(errBody.Error.Message, "create a new key") {
		t.Fatalf("roll again after the replacement was revoked: %d %+v, want 409 saying to create a new key", s, errBody.Error)
	}
}

// A key created with a scope nothing asks for is made, with a warning: a
// misspelt scope made a key refused everywhere, without a word.
func TestAKeyWithAScopeNothingAsksForIsWarnedOf(t *testing.T) {
	env := edgetest.New(t)
	sum := sha256.Sum256([]byte(adminToken))
	routes := []edge.RouteConfig{{Pattern: "/v1/widgets", Methods: []string{"GET"}, Scopes: []string{"widgets:read"}}}
	a, err := edge.NewAdmin(hex.EncodeToString(sum[:]), edge.AdminDeps{Store: env.Store, Scopes: edge.KnownScopes(routes)})
	testenv.Must(t, err, "new admin")
	s := httptest.NewServer(a)
	t.Cleanup(s.Close)
	admin := adminClient{t: t, url: s.URL}
	if st := admin.call("PUT", "/admin/v1/accounts/acct_scopes", adminToken, `{}`, nil); st != 200 {
		t.Fatalf("put account: %d", st)
	}
	for _, c := range []struct {
		scopes string
		warned []string
	}{
		{`["widgets:read"]`, nil},
		{`["*:read","events:write","usage:read","invoices:read"]`, nil},
		{`["widget:read","widgets:read"]`, []string{"widget:read"}},
		{`["widgets:write"]`, []string{"widgets:write"}},
	} {
		var created edge.CreatedKey
		if st := admin.call("POST", "/admin/v1/accounts/acct_scopes/keys", adminToken, `{"scopes":`+c.scopes+`}`, &created); st != 201 {
			t.Fatalf("create a key with scopes %s: %d", c.scopes, st)
		}
		if len(created.Warnings) != len(c.warned) {
			t.Fatalf("scopes %s: warnings %q, want one each for %q", c.scopes, created.Warnings, c.warned)
		}
		for i, w := range c.warned {
			if !strings.Contains(created.Warnings[i], strconv.Quote(w)) {
				t.Fatalf("scopes %s: warning %q does not name %q", c.scopes, created.Warnings[i], w)
			}
		}
	}
}

// PUT on an account sets what it is given and keeps the rest: a rename used
// to answer 200 with the new name and store nothing. A zone change is
// recorded for the aggregator, which re-rolls the account's rollups on it.
func TestAdminPutAccountUpdatesIt(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	admin := startAdmin(t, env, in.Audit)
	put := func(body string, want edge.Account) {
		t.Helper()
		var got edge.Account
		if s := admin.call("PUT", "/admin/v1/accounts/"+want.ID, adminToken, body, &got); s != 200 || got != want {
			t.Fatalf("PUT %s: %d %+v, want 200 %+v", body, s, got, want)
		}
		var stored edge.Account
		testenv.Must(t, env.PG.Pool.QueryRow(context.Background(), "SELECT id, name, timezone FROM accounts WHERE id = $1", want.ID).
			Scan(&stored.ID, &stored.Name, &stored.TimeZone), "read the account")
		if stored != want {
			t.Fatalf("PUT %s: stored %+v, want %+v", body, stored, want)
		}
	}
	put(`{"name":"Old Name"}`, edge.Account{ID: "acct_put", Name: "Old Name", TimeZone: "UTC"})
	put(`{"name":"New Name"}`, edge.Account{ID: "acct_put", Name: "New Name", TimeZone: "UTC"})
	put(`{}`, edge.Account{ID: "acct_put", Name: "New Name", TimeZone: "UTC"})
	put(`{"timezone":"Asia/Tokyo"}`, edge.Account{ID: "acct_put", Name: "New Name", TimeZone: "Asia/Tokyo"})
	put(`{}`, edge.Account{ID: "acct_new", Name: "acct_new", TimeZone: "UTC"})
	put(`{"name":"Zoned","timezone":"Europe/Berlin"}`, edge.Account{ID: "acct_zoned", Name: "Zoned", TimeZone: "Europe/Berlin"})

	var changed *time.Time
	testenv.Must(t, env.PG.Pool.QueryRow(context.Background(), "SELECT timezone_changed_at FROM accounts WHERE id = 'acct_put'").Scan(&changed), "read the zone change")
	if changed == nil {
		t.Fatal("the zone change was not recorded (accounts.timezone_changed_at)")
	}
	var errBody struct{ Error edge.APIError }
	for _, bad := range []string{`{"timezone":"Mars/Olympus_Mons"}`, `{"timezone":""}`, `{"timezone":"Local"}`, `{"timezone":3}`} {
		if s := admin.call("PUT", "/admin/v1/accounts/acct_put", adminToken, bad, &errBody); s != 400 {
			t.Fatalf("PUT %s: %d %+v, want 400", bad, s, errBody.Error)
		}
	}
	put(`{}`, edge.Account{ID: "acct_put", Name: "New Name", TimeZone: "Asia/Tokyo"})
}

// Text Postgres cannot store (a NUL, invalid UTF-8) and ids no key or
// account could have get a 4xx, never a 500; a revoke whose reason was
// refused used to roll back behind a 500 and leave the key active.
func TestAdminRefusesTextItCannotStore(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	admin := startAdmin(t, env, in.Audit)
	if s := admin.call("PUT", "/admin/v1/accounts/acct_txt", adminToken, `{"name":"Text Co"}`, nil); s != 200 {
		t.Fatalf("put account: %d", s)
	}
	var created edge.CreatedKey
	if s := admin.call("POST", "/admin/v1/accounts/acct_txt/keys", adminToken, `{"name":"caf\u00e9 ok"}`, &created); s != 201 {
		t.Fatalf("create a key with a non-ASCII name: %d", s)
	}
	for _, c := range []struct {
		method, path, body string
		want               int
	}{
		{"PUT", "/admin/v1/accounts/acct_txt", `{"name":"a\u0000b"}`, 400},
		{"POST", "/admin/v1/accounts/acct_txt/keys", `{"name":"a\u0000b"}`, 400},
		{"POST", "/admin/v1/accounts/acct_txt/keys", `{"name":"` + strings.Repeat("n", 201) + `"}`, 400},
		{"POST", "/admin/v1/accounts/%FF/keys", `{}`, 400},
		{"GET", "/admin/v1/accounts/%00/keys", "", 400},
		{"GET", "/admin/v1/keys/%00", "", 404},
		{"GET", "/admin/v1/keys/%FF", "", 404},
		{"POST", "/admin/v1/keys/%00/roll", "", 404},
		{"POST", "/admin/v1/keys/%00/revoke", "", 404},
		{"POST", "/admin/v1/keys/" + created.Key.ID + "/revoke", `{"reason":"\u0000"}`, 400},
		{"POST", "/admin/v1/keys/" + created.Key.ID + "/revoke", `{"reason":"line\nbreak"}`, 400},
	} {
		var e struct{ Error edge.APIError }
		if s := admin.call(c.method, c.path, adminToken, c.body, &e); s != c.want || e.Error.RequestID == "" {
			t.Errorf("%s %s %s: %d %+v, want %d", c.method, c.path, c.body, s, e.Error, c.want)
		}
	}
	// The refused revokes left the key as it was: active, and serving.
	if r := edgetest.Do(t, "GET", in.URL+"/v1/x", created.Secret, nil); r.Status != 200 {
		t.Fatalf("the key after refused revokes: %d %s", r.Status, r.Body)
	}
	var revoked edge.KeyView
	if s := admin.call("POST", "/admin/v1/keys/"+created.Key.ID+"/revoke", adminToken, `{"reason":"rotated, café"}`, &revoked); s != 200 || revoked.Status != "revoked" {
		t.Fatalf("revoke with a plain reason: %d %+v", s, revoked)
	}
}

func filterKeyEvents(rows []string) []string {
	var out []string
	for _, r := range rows {
		if strings.HasPrefix(r, "key.") {
			out = append(out, r)
		}
	}
	return out
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

func TestFailedAuthFloodIsFoldedIntoFewAuditRows(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	unknown, _, err := edge.GenerateKey(edge.Secret, schemas.Live)
	testenv.Must(t, err, "generate")
	const n = 300
	for i := 0; i < n; i++ {
		key := unknown
		if i%3 == 0 {
			key = "sk_live_garbage"
		}
		if r := edgetest.Do(t, "GET", in.URL+"/v1/x", key, nil); r.Status != 401 {
			t.Fatalf("status %d", r.Status)
		}
	}
	in.Audit.Flush(context.Background())
	var rows, total int
	err = env.PG.Pool.QueryRow(context.Background(), `SELECT count(*), coalesce(sum((details->>'count')::int), 0)
		FROM audit_log WHERE action = $1`, edge.ActionAuthFailed).Scan(&rows, &total)
	testenv.Must(t, err, "count audit rows")
	if total != n {
		t.Fatalf("audit rows account for %d failures, want %d", total, n)
	}
	// Two kinds of failure from one address, folded per 100 ms flush: far
	// fewer rows than failures.
	if rows < 2 || rows > n/5 {
		t.Fatalf("%d audit rows for %d failures; want folding", rows, n)
	}
	var prefix, reason string
	err = env.PG.Pool.QueryRow(context.Background(), `SELECT key_prefix, reason FROM audit_log
		WHERE action = $1 AND reason = 'unknown' LIMIT 1`, edge.ActionAuthFailed).Scan(&prefix, &reason)
	testenv.Must(t, err, "unknown-key row")
	if prefix != unknown[:12] {
		t.Fatalf("audit prefix %q, want the display prefix %q", prefix, unknown[:12])
	}
	t.Logf("%d failures -> %d audit rows", n, rows)
}

// A malformed credential's audit row keeps a display prefix only of what
// starts as a key does: a short password or token sent by mistake would
// otherwise sit whole in the audit log.
func TestAuditKeepsNoPrefixOfWhatIsNotAKey(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	for _, c := range []struct{ sent, want string }{
		{"hunter2", ""},
		{"tok-8f3a9c", ""},
		{"sk_prod_abcdefgh", ""},
		{"pk_test_", "pk_test_"},
		{"sk_live_garbage", "sk_live_garb"},
	} {
		if r := edgetest.Do(t, "GET", in.URL+"/v1/x", c.sent, nil); r.Status != 401 || r.Error.Code != "malformed_api_key" {
			t.Fatalf("%q: %d %q", c.sent, r.Status, r.Error.Code)
		}
		in.Audit.Flush(context.Background())
		var prefix string
		err := env.PG.Pool.QueryRow(context.Background(), `SELECT coalesce(key_prefix, '') FROM audit_log
			WHERE action = $1 ORDER BY id DESC LIMIT 1`, edge.ActionAuthFailed).Scan(&prefix)
		testenv.Must(t, err, "audit row")
		if prefix != c.want {
			t.Errorf("%q: audit prefix %q, want %q", c.sent, prefix, c.want)
		}
	}
}

func TestReportEventsBatch(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	key, keyID := env.Key(t, "acct_report", edge.Secret, schemas.Live)
	pub, _ := env.Key(t, "acct_report", edge.Publishable, schemas.Live)
	at := time.Now().UTC().Add(-time.Minute).Format(time.RFC3339Nano)
	body := fmt.Sprintf(`{"events":[
		{"id":"c-1","type":"tokens","time":%q,"units":120,"dimensions":{"model":"small"}},
		{"id":"c-2","type":"tokens","time":%q},
		{"id":"c-1","type":"tokens","time":%q,"units":120,"dimensions":{"model":"small"}},
		{"id":"","type":"Bad Type","time":%q},
		{"id":"c-3","type":"tokens","time":%q,"units":-1},
		{"id":"c-4","typo":"x"}
	]}`, at, at, at, at, at)
	post := func(key, body string) (int, edge.BatchResult) {
		r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(body))
		var out edge.BatchResult
		if r.Status == 200 {
			testenv.Must(t, json.Unmarshal(r.Body, &out), "decode")
		}
		return r.Status, out
	}
	status, res := post(key, body)
	if status != 200 || res.Accepted != 2 || res.Duplicates != 1 || res.Rejected != 3 {
		t.Fatalf("status %d result %+v", status, res)
	}
	wantStatus := []string{"accepted", "accepted", "duplicate", "rejected", "rejected", "rejected"}
	for i, r := range res.Results {
		if r.Status != wantStatus[i] || r.Index != i {
			t.Fatalf("item %d: %+v, want %s", i, r, wantStatus[i])
		}
	}
	fields := map[string]bool{}
	for _, e := range res.Results[3].Errors {
		fields[e.Field] = true
	}
	if !fields["id"] || !fields["type"] || res.Results[4].Errors[0].Field != "units" {
		t.Fatalf("per-item errors: %+v %+v", res.Results[3].Errors, res.Results[4].Errors)
	}
	// A retry gives the same event ids: idempotent downstream.
	_, again := post(key, body)
	if again.Results[0].EventID != res.Results[0].EventID || res.Results[0].EventID != schemas.ClientEventID("acct_report", schemas.Live, "c-1").String() {
		t.Fatalf("retry event id %s, first %s", again.Results[0].EventID, res.Results[0].EventID)
	}
	big := `{"events":[` + strings.Repeat(`{"id":"x","type":"t","time":"2026-01-01T00:00:00Z"},`, edge.MaxBatch) + `{"id":"y","type":"t","time":"2026-01-01T00:00:00Z"}]}`
	r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(big))
	if r.Status != 400 || r.Error.Code != "batch_too_large" {
		t.Fatalf("1001 events: %d %+v", r.Status, r.Error)
	}
	if r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(`[1,2]`)); r.Status != 400 || r.Error.Code != "invalid_json" {
		t.Fatalf("bad json: %d %+v", r.Status, r.Error)
	}
	if r := edgetest.Do(t, "POST", in.URL+"/v1/events", pub, strings.NewReader(body)); r.Status != 403 {
		t.Fatalf("publishable key reporting events: %d", r.Status)
	}
	evs := edgetest.ReadTopic(t, env.Brokers, env.Topic, 4, 20*time.Second)
	if len(evs) != 4 {
		t.Fatalf("%d events in the topic, want 4 (2 per batch; downstream dedups the retry by id)", len(evs))
	}
	ids := map[string]int{}
	for _, ev := range evs {
		ids[ev.ID.String()]++
		if ev.AccountID != "acct_report" || ev.KeyID != keyID || ev.Environment != schemas.Live || ev.Type != "tokens" {
			t.Fatalf("event %+v", ev)
		}
	}
	if len(ids) != 2 || ids[schemas.ClientEventID("acct_report", schemas.Live, "c-1").String()] != 2 {
		t.Fatalf("event ids %v", ids)
	}
	if env.Live.Calls() != 0 {
		t.Fatalf("POST /v1/events reached the upstream %d times", env.Live.Calls())
	}
}

// Items that ingest would never count, or count wrongly, are refused at the
// edge with the field named; a body with more after the object is refused
// whole; a huge array stops at the element past the limit.
func TestReportEventsRefusesWhatWouldNotCount(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_refuse", edge.Secret, schemas.Live)
	now := time.Now().UTC()
	at := now.Add(-time.Minute).Format(time.RFC3339Nano)
	old := now.Add(-edge.DefaultMaxEventAge - time.Hour).Format(time.RFC3339Nano)
	body := fmt.Sprintf(`{"events":[
		{"id":"ok","type":"tokens","time":%q,"units":%d},
		{"id":"huge","type":"tokens","time":%q,"units":%d},
		{"id":"old","type":"tokens","time":%q},
		{"id":"test\u0000job-1","type":"tokens","time":%q},
		{"id":"half","type":"tokens","time":%q,"units":1.5},
		{"id":"nozone","type":"tokens","time":"2026-01-01T00:00:00"},
		{"id":"case","type":"tokens","time":%q,"Units":1000},
		{"id":"twice","type":"tokens","time":%q,"units":1,"units":1000},
		{"id":"dimtwice","type":"tokens","time":%q,"dimensions":{"model":"a","model":"b"}},
		{"id":"dimarray","type":"tokens","time":%q,"dimensions":["Units"]},
		{"id":"nullunits","type":"tokens","time":%q,"units":null},
		{"id":"oldoffset","type":"tokens","time":"1999-12-31T23:30:00-05:00"},
		{"id":"numbertime","type":"tokens","time":1764460800},
		{"id":"unknownfirst","type":"tokens","bogus":1,"time":7},
		{"id":"hugeunits","type":"tokens","time":%q,"units":99999999999999999999}
	]}`, at, schemas.MaxUnits, at, schemas.MaxUnits+1, old, at, at, at, at, at, at, at, at)
	r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(body))
	var res edge.BatchResult
	if r.Status != 200 || json.Unmarshal(r.Body, &res) != nil {
		t.Fatalf("status %d body %s", r.Status, r.Body)
	}
	wantField := []string{"", "units", "time", "id", "units", "time", "Units", "units", "dimensions.model", "dimensions", "units", "time", "time", "bogus", "units"}
	// Each problem carries a code a client can act on, not only words.
	wantCode := []string{"", schemas.ProblemOutOfRange, schemas.ProblemTooOld, schemas.ProblemInvalidCharacters,
		schemas.ProblemWrongType, schemas.ProblemInvalidTime, schemas.ProblemUnknownField, schemas.ProblemDuplicateField,
		schemas.ProblemDuplicateField, schemas.ProblemWrongType, schemas.ProblemNull, schemas.ProblemTooOld,
		schemas.ProblemWrongType, schemas.ProblemUnknownField, schemas.ProblemOutOfRange}
	for i, item := range res.Results {
		if i == 0 {
			if item.Status != "accepted" {
				t.Errorf("item 0: %+v, want accepted", item)
			}
			continue
		}
		if item.Status != "rejected" || len(item.Errors) != 1 || item.Errors[0].Field != wantField[i] || item.Errors[0].Code != wantCode[i] {
			t.Errorf("item %d: %+v, want rejected on %q alone, code %q", i, item, wantField[i], wantCode[i])
		}
	}
	// The codes are in the body as sent, under "code".
	if !strings.Contains(string(r.Body), `"field":"units","code":"out_of_range","reason":`) {
		t.Errorf("body does not carry the codes: %s", r.Body)
	}
	if res.Accepted != 1 || res.Rejected != 14 {
		t.Fatalf("result %+v", res)
	}

	// A second object after the first is not ignored: the body is refused.
	one := fmt.Sprintf(`{"events":[{"id":"trail-1","type":"tokens","time":%q}]}`, at)
	if r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(one+" "+strings.Replace(one, "trail-1", "trail-2", 1))); r.Status != 400 || r.Error.Code != "invalid_json" {
		t.Fatalf("two objects: %d %+v, want 400 invalid_json", r.Status, r.Error)
	}
	// Millions of tiny elements are refused without decoding them all.
	zeros := `{"events":[0` + strings.Repeat(",0", 2_000_000) + `]}`
	if r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(zeros)); r.Status != 400 || r.Error.Code != "batch_too_large" {
		t.Fatalf("2,000,001 elements: %d %+v, want 400 batch_too_large", r.Status, r.Error)
	}
	for _, bad := range []string{`{"events":[]}`, `{"events":null}`, `{}`} {
		if r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(bad)); r.Status != 400 || r.Error.Code != "empty_batch" {
			t.Fatalf("%s: %d %+v, want 400 empty_batch", bad, r.Status, r.Error)
		}
	}
	for _, bad := range []string{`{"events":[],"extra":1}`, `{"events":{}}`, `{"events":[{}]`, `[]`} {
		if r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(bad)); r.Status != 400 || r.Error.Code != "invalid_json" {
			t.Fatalf("%s: %d %+v, want 400 invalid_json", bad, r.Status, r.Error)
		}
	}
	evs := edgetest.ReadTopic(t, env.Brokers, env.Topic, 1, 20*time.Second)
	if len(evs) != 1 || evs[0].ClientID != "ok" || evs[0].Units != schemas.MaxUnits {
		t.Fatalf("topic holds %+v, want only the accepted item", evs)
	}
}

// Text that JSON decoding would change is refused: Go's decoder turns bytes
// that are not UTF-8 and lone surrogate escapes into U+FFFD, so "order-caf\xe9"
// and "order-caf\xe8" became one id, and the second event was dropped
// downstream as a retry of the first. Surrogate pairs, an escaped U+FFFD
// and an escaped backslash before "u" are text like any other.
func TestReportEventsRefusesTextThatDecodingWouldChange(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_utf8", edge.Secret, schemas.Live)
	at := time.Now().UTC().Add(-time.Minute).Format(time.RFC3339Nano)
	items := []struct{ item, field string }{
		{`{"id":"order-caf` + "\xe9" + `","type":"tokens","time":"AT"}`, "id"},
		{`{"id":"order-caf` + "\xe8" + `","type":"tokens","time":"AT"}`, "id"},
		{`{"id":"lone-\ud800","type":"tokens","time":"AT"}`, "id"},
		{`{"id":"low-\udc00x","type":"tokens","time":"AT"}`, "id"},
		{`{"id":"dim","type":"tokens","time":"AT","dimensions":{"model":"m` + "\xff" + `"}}`, "dimensions.model"},
		{`{"id":"pair-\ud83d\ude00","type":"tokens","time":"AT"}`, ""},
		{`{"id":"replacement-\ufffd","type":"tokens","time":"AT"}`, ""},
		{`{"id":"backslash-\\ud800","type":"tokens","time":"AT"}`, ""},
	}
	var parts []string
	for _, it := range items {
		parts = append(parts, strings.ReplaceAll(it.item, "AT", at))
	}
	r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(`{"events":[`+strings.Join(parts, ",")+`]}`))
	var res edge.BatchResult
	if r.Status != 200 || json.Unmarshal(r.Body, &res) != nil {
		t.Fatalf("status %d body %s", r.Status, r.Body)
	}
	for i, item := range res.Results {
		switch want := items[i].field; {
		case want == "" && item.Status != "accepted":
			t.Errorf("item %d (%s): %+v, want accepted", i, items[i].item, item)
		case want != "" && (item.Status != "rejected" || len(item.Errors) != 1 || item.Errors[0].Field != want || item.Errors[0].Code != schemas.ProblemInvalidText):
			t.Errorf("item %d (%s): %+v, want rejected on %q alone", i, items[i].item, item, want)
		}
	}
	if res.Accepted != 3 || res.Rejected != 5 {
		t.Fatalf("result %+v, want 3 accepted and 5 rejected", res)
	}
	evs := edgetest.ReadTopic(t, env.Brokers, env.Topic, 3, 20*time.Second)
	var got []string
	for _, e := range evs {
		got = append(got, e.ClientID)
	}
	slices.Sort(got)
	if want := []string{`backslash-\ud800`, "pair-\U0001F600", "replacement-\uFFFD"}; !slices.Equal(got, want) {
		t.Fatalf("topic holds client ids %q, want %q", got, want)
	}
}

// A caller that POST /v1/events will refuse gets its answer before it has
// sent its body: the edge neither waits for nor holds up to 8 MiB of it.
func TestReportEventsRefusesACallerBeforeReadingItsBody(t *testing.T) {
	env := edgetest.New(t)
	pub, _ := env.Key(t, "acct_early", edge.Publishable, schemas.Live)
	for _, fr := range fronts {
		t.Run(fr.name, func(t *testing.T) {
			in := env.Start(t, edgetest.Options{NetHTTP: fr.netHTTP})
			for _, c := range []struct {
				name, auth string
				status     int
			}{
				{"no key", "", 401},
				{"an unknown key", "Authorization: Bearer sk_live_" + strings.Repeat("A", 30) + "\r\n", 401},
				{"a publishable key", "Authorization: Bearer " + pub + "\r\n", 403},
			} {
				conn, err := net.Dial("tcp", strings.TrimPrefix(in.URL, "http://"))
				testenv.Must(t, err, "dial the edge")
				_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
				// Headers for an 8,000,000-byte body, then only its first
				// 16 KiB (more than fasthttp reads ahead of any handler).
				_, err = io.WriteString(conn, "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"+c.auth+
					"Content-Length: 8000000\r\n\r\n{\"events\":["+strings.Repeat(" ", 16<<10))
				testenv.Must(t, err, "send")
				resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
				if err != nil {
					t.Fatalf("%s: no answer while the body is still coming: %v", c.name, err)
				}
				resp.Body.Close()
				conn.Close()
				if resp.StatusCode != c.status {
					t.Errorf("%s: status %d, want %d", c.name, resp.StatusCode, c.status)
				}
			}
		})
	}
}

// adminKeys counts acct_adm's keys as the admin API lists them.
func adminKeys(t *testing.T, admin adminClient) int {
	t.Helper()
	var list struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if s := admin.call("GET", "/admin/v1/accounts/acct_adm/keys", adminToken, "", &list); s != 200 {
		t.Fatalf("list keys: %d", s)
	}
	return len(list.Keys)
}

// Inside one batch a duplicate is what ingest counts once: the same id,
// type and second. The same id with another type or time is another event,
// accepted as it would be in a batch of its own (it was reported as a
// duplicate and never sent, so how a client batched its events decided
// what it was billed).
func TestReportEventsBatchDuplicatesAreRowsNotIDs(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_rows", edge.Secret, schemas.Live)
	at := time.Now().UTC().Add(-time.Minute).Truncate(time.Second)
	item := func(typ string, t time.Time) string {
		return fmt.Sprintf(`{"id":"job-1","type":%q,"time":%q,"units":3}`, typ, t.Format(time.RFC3339Nano))
	}
	body := `{"events":[` + strings.Join([]string{
		item("tokens", at), item("images", at), item("tokens", at.Add(300*time.Millisecond)), item("tokens", at.Add(time.Second)),
	}, ",") + `]}`
	r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(body))
	var res edge.BatchResult
	testenv.Must(t, json.Unmarshal(r.Body, &res), "decode")
	want := []string{"accepted", "accepted", "duplicate", "accepted"}
	for i, w := range want {
		if i >= len(res.Results) || res.Results[i].Status != w {
			t.Fatalf("results %+v, want %v", res.Results, want)
		}
	}
	if evs := edgetest.ReadTopic(t, env.Brokers, env.Topic, 3, 20*time.Second); len(evs) != 3 {
		t.Fatalf("%d events in the topic, want 3", len(evs))
	}
}

// An item's errors are bounded whatever it holds: at most 21, the last
// saying how many more there are, and no name quoted longer than 80 bytes.
// Before, each dimension with text that decoding would change added one
// (an item of 100 such keys and an old time got 122), and an unknown
// field's name was quoted whole.
func TestAReportedItemsErrorsAreBounded(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	key, _ := env.Key(t, "acct_many_errors", edge.Secret, schemas.Live)
	old := time.Now().UTC().Add(-edge.DefaultMaxEventAge - time.Hour).Format(time.RFC3339Nano)
	var dims strings.Builder
	for i := range 100 {
		if i > 0 {
			dims.WriteByte(',')
		}
		fmt.Fprintf(&dims, `"k%d\ud800":"v"`, i)
	}
	long := strings.Repeat("x", 10_000)
	body := fmt.Sprintf(`{"events":[{"id":"many","type":"tokens","time":%q,"dimensions":{%s}},{"id":"unknown","type":"tokens","time":%q,%q:1}]}`,
		old, dims.String(), old, long)
	r := edgetest.Do(t, "POST", in.URL+"/v1/events", key, strings.NewReader(body))
	var res edge.BatchResult
	if r.Status != 200 || json.Unmarshal(r.Body, &res) != nil || len(res.Results) != 2 {
		t.Fatalf("status %d body %.300s", r.Status, r.Body)
	}
	// 100 dimensions with broken text, 100 with keys the schema refuses
	// (the surrogate is not a letter), too many dimensions, the old time:
	// 202 problems, 21 listed, the last saying 181 more.
	errs := res.Results[0].Errors
	if len(errs) != schemas.MaxProblems+1 || !strings.Contains(errs[len(errs)-1].Reason, "(and 181 more problems, not listed)") {
		t.Fatalf("item 0: %d errors, the last %+v; want %d, the last saying how many more", len(errs), errs[len(errs)-1], schemas.MaxProblems+1)
	}
	for _, item := range res.Results {
		for _, e := range item.Errors {
			if len(e.Field) > len("dimensions.")+80 {
				t.Fatalf("item %s: a field name of %d bytes", item.ID, len(e.Field))
			}
		}
	}
	if res.Results[1].Status != "rejected" || len(res.Results[1].Errors) != 1 {
		t.Fatalf("item 1: %+v, want rejected on its unknown field", res.Results[1])
	}
}

// An expiry past what any key needs (here past year 9999 in UTC, which JSON
// cannot write) is refused, and stores nothing. Before, the key was stored,
// audited and active, and its create, its account's key list and its
// revoke answered 500 from then on.
func TestAKeyExpiryFarAheadIsRefused(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	admin := startAdmin(t, env, in.Audit)
	if s := admin.call("PUT", "/admin/v1/accounts/acct_y10k", adminToken, `{}`, nil); s != 200 {
		t.Fatalf("put account: %d", s)
	}
	var errBody struct{ Error edge.APIError }
	for _, at := range []string{"9999-12-31T23:59:59-23:59", "2200-01-01T00:00:00Z"} {
		if s := admin.call("POST", "/admin/v1/accounts/acct_y10k/keys", adminToken, `{"name":"far","expires_at":"`+at+`"}`, &errBody); s != 400 || errBody.Error.Code != "invalid_request" {
			t.Fatalf("expires_at %s: %d %q, want 400 invalid_request", at, s, errBody.Error.Code)
		}
	}
	var created edge.CreatedKey
	if s := admin.call("POST", "/admin/v1/accounts/acct_y10k/keys", adminToken, `{"name":"near","expires_at":"2090-06-01T12:00:00+02:00"}`, &created); s != 201 {
		t.Fatalf("an expiry in 2090: %d", s)
	}
	if got := created.Key.ExpiresAt; got == nil || !got.Equal(time.Date(2090, 6, 1, 10, 0, 0, 0, time.UTC)) {
		t.Fatalf("expires_at %v, want 2090-06-01T10:00:00Z", got)
	}
	var list struct{ Keys []edge.KeyView }
	if s := admin.call("GET", "/admin/v1/accounts/acct_y10k/keys", adminToken, "", &list); s != 200 || len(list.Keys) != 1 {
		t.Fatalf("list: %d, %d keys; want the one key", s, len(list.Keys))
	}
}

// SDKs gzip large batches (Content-Encoding: gzip). Such a batch is
// decoded and reported as any other, bounded by MaxBatchBytes once
// inflated; another coding is refused as such, not as JSON that does not
// start with {.
func TestAGzippedBatchIsReported(t *testing.T) {
	env := edgetest.New(t)
	for _, netHTTP := range []bool{false, true} {
		t.Run(fmt.Sprintf("net/http handler %v", netHTTP), func(t *testing.T) {
			in := env.Start(t, edgetest.Options{NetHTTP: netHTTP})
			key, _ := env.Key(t, fmt.Sprintf("acct_gzip_%v", netHTTP), edge.Secret, schemas.Live)
			at := time.Now().UTC().Add(-time.Minute).Format(time.RFC3339Nano)
			gz := func(s string) *bytes.Buffer {
				var b bytes.Buffer
				zw := gzip.NewWriter(&b)
				_, _ = io.WriteString(zw, s)
				_ = zw.Close()
				return &b
			}
			post := func(body io.Reader, encoding string) edgetest.Response {
				req, _ := http.NewRequest("POST", in.URL+"/v1/events", body)
				req.Header.Set("Authorization", "Bearer "+key)
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Content-Encoding", encoding)
				return edgetest.DoRequest(t, req)
			}
			r := post(gz(fmt.Sprintf(`{"events":[{"id":"z-1","type":"tokens","time":%q,"units":3}]}`, at)), "gzip")
			var res edge.BatchResult
			if r.Status != 200 || json.Unmarshal(r.Body, &res) != nil || res.Accepted != 1 {
				t.Fatalf("a gzipped batch: %d %s", r.Status, r.Body)
			}
			// Inflating past the bound is refused as a large body.
			bomb := `{"events":[` + strings.Repeat(" ", edge.MaxBatchBytes) + `]}`
			if r := post(gz(bomb), "gzip"); r.Status != 413 || r.Error.Code != "payload_too_large" {
				t.Fatalf("a gzipped batch of more than %d bytes inflated: %d %+v", edge.MaxBatchBytes, r.Status, r.Error)
			}
			if r := post(strings.NewReader("not gzip"), "gzip"); r.Status != 400 || r.Error.Code != "invalid_body" {
				t.Fatalf("a body that is not gzip: %d %+v", r.Status, r.Error)
			}
			if r := post(strings.NewReader("x"), "br"); r.Status != 415 || r.Error.Code != "unsupported_content_encoding" {
				t.Fatalf("Content-Encoding br: %d %+v", r.Status, r.Error)
			}
		})
	}
}

// A create retried after a lost answer, with the same Idempotency-Key,
// makes no second key: it is answered with the first one's key (never its
// secret again). The key is the account's own, is refused with other
// parameters, and of creates racing with one key exactly one makes it.
func TestAKeyCreateWithAnIdempotencyKeyMakesOneKey(t *testing.T) {
	env := edgetest.New(t)
	in := env.Start(t, edgetest.Options{})
	admin := startAdmin(t, env, in.Audit)
	for _, acct := range []string{"acct_idem", "acct_idem2"} {
		if s := admin.call("PUT", "/admin/v1/accounts/"+acct, adminToken, `{}`, nil); s != 200 {
			t.Fatalf("put account %s: %d", acct, s)
		}
	}
	create := func(acct, idem, body string) (int, edge.CreatedKey, edge.APIError, http.Header) {
		t.Helper()
		req, _ := http.NewRequest("POST", admin.url+"/admin/v1/accounts/"+acct+"/keys", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+adminToken)
		req.Header.Set("Content-Type", "application/json")
		if idem != "" {
			req.Header.Set(edge.HeaderIdempotencyKey, idem)
		}
		resp, err := http.DefaultClient.Do(req)
		testenv.Must(t, err, "create key")
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var ck edge.CreatedKey
		var eb struct{ Error edge.APIError }
		if resp.StatusCode < 300 {
			testenv.Must(t, json.Unmarshal(b, &ck), "decode "+string(b))
		} else {
			testenv.Must(t, json.Unmarshal(b, &eb), "decode "+string(b))
		}
		return resp.StatusCode, ck, eb.Error, resp.Header
	}
	keys := func(acct string) []edge.KeyView {
		t.Helper()
		var list struct{ Keys []edge.KeyView }
		if s := admin.call("GET", "/admin/v1/accounts/"+acct+"/keys", adminToken, "", &list); s != 200 {
			t.Fatalf("list keys of %s: %d", acct, s)
		}
		return list.Keys
	}

	t.Run("a retry is answered with the first key and no secret", func(t *testing.T) {
		s, first, _, _ := create("acct_idem", "order-77", `{"name":"ci"}`)
		if s != 201 || first.Secret == "" || first.Replayed {
			t.Fatalf("first create: %d %+v, want 201 with a secret", s, first)
		}
		// The defaults spelt out are the same request.
		s, again, e, h := create("acct_idem", "order-77", `{"environment":"live", "kind":"secret", "name":"ci"}`)
		if s != 200 || again.Key.ID != first.Key.ID || again.Secret != "" || !again.Replayed || h.Get(edge.HeaderIdempotentReplayed) != "true" {
			t.Fatalf("retry: %d %+v %+v (%s: %q), want 200 with key %s, replayed, no secret", s, again, e, edge.HeaderIdempotentReplayed, h.Get(edge.HeaderIdempotentReplayed), first.Key.ID)
		}
		if ks := keys("acct_idem"); len(ks) != 1 {
			t.Fatalf("%d keys after a create and its retry, want 1", len(ks))
		}
		// The first answer's secret is the key's.
		r := edgetest.Do(t, "GET", in.URL+"/v1/ping", first.Secret, nil)
		if r.Status == 401 {
			t.Fatalf("the first answer's secret is refused: %+v", r.Error)
		}
	})
	t.Run("other parameters with the same key are refused", func(t *testing.T) {
		s, _, e, _ := create("acct_idem", "order-77", `{"name":"other"}`)
		if s != 400 || e.Code != "idempotency_key_reused" {
			t.Fatalf("reuse with another name: %d %+v, want 400 idempotency_key_reused", s, e)
		}
		if ks := keys("acct_idem"); len(ks) != 1 {
			t.Fatalf("%d keys after a refused reuse, want 1", len(ks))
		}
	})
	t.Run("another account's create with the same key makes its own key", func(t *testing.T) {
		if s, ck, _, _ := create("acct_idem2", "order-77", `{"name":"ci"}`); s != 201 || ck.Secret == "" {
			t.Fatalf("another account: %d %+v, want 201", s, ck)
		}
	})
	t.Run("of creates racing with one key exactly one makes it", func(t *testing.T) {
		const n = 8
		var wg sync.WaitGroup
		status := make([]int, n)
		ids := make([]string, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s, ck, _, _ := create("acct_idem2", "race-1", `{"name":"race","kind":"publishable"}`)
				status[i], ids[i] = s, ck.Key.ID
			}()
		}
		wg.Wait()
		made := 0
		for i := range n {
			switch {
			case status[i] == 201:
				made++
			case status[i] != 200:
				t.Errorf("create %d: %d, want 201 or 200", i, status[i])
			}
			if ids[i] != ids[0] || ids[i] == "" {
				t.Errorf("create %d answered with key %q, the first with %q", i, ids[i], ids[0])
			}
		}
		if made != 1 {
			t.Fatalf("%d of %d racing creates made a key, want 1", made, n)
		}
		if ks := keys("acct_idem2"); len(ks) != 2 {
			t.Fatalf("%d keys, want 2 (one per Idempotency-Key)", len(ks))
		}
	})
	t.Run("the same scopes in another order, or repeated, are the same request", func(t *testing.T) {
		s, first, _, _ := create("acct_idem", "scopes-1", `{"name":"s","scopes":["a:read","b:read"]}`)
		if s != 201 {
			t.Fatalf("first create: %d", s)
		}
		if s, again, e, _ := create("acct_idem", "scopes-1", `{"name":"s","scopes":["b:read","a:read","b:read"]}`); s != 200 || again.Key.ID != first.Key.ID {
			t.Fatalf("retry with the scopes reordered: %d %+v %+v, want 200 with key %s", s, again, e, first.Key.ID)
		}
	})
	t.Run("a key that no longer works is no answer to a retry", func(t *testing.T) {
		s, first, _, _ := create("acct_idem", "revoked-1", `{"name":"r"}`)
		if s != 201 {
			t.Fatalf("first create: %d", s)
		}
		if s := admin.call("POST", "/admin/v1/keys/"+first.Key.ID+"/revoke", adminToken, `{}`, nil); s != 200 {
			t.Fatalf("revoke: %d", s)
		}
		if s, _, e, _ := create("acct_idem", "revoked-1", `{"name":"r"}`); s != 409 || e.Code != "idempotency_key_used" || !strings.Contains(e.Message, first.Key.ID) {
			t.Fatalf("retry after the key was revoked: %d %+v, want 409 idempotency_key_used naming %s", s, e, first.Key.ID)
		}
	})
	t.Run("a retry after the key's expiry is told the key expired, not that its request is invalid", func(t *testing.T) {
		body := fmt.Sprintf(`{"name":"short","expires_at":%q}`, time.Now().Add(2*time.Second).UTC().Format(time.RFC3339Nano))
		s, first, _, _ := create("acct_idem", "short-1", body)
		if s != 201 {
			t.Fatalf("first create: %d", s)
		}
		testenv.Wait(t, 10*time.Second, "the key to expire", func() bool { return !time.Now().Before(*first.Key.ExpiresAt) })
		if s, _, e, _ := create("acct_idem", "short-1", body); s != 409 || e.Code != "idempotency_key_used" {
			t.Fatalf("retry after the key expired: %d %+v, want 409 idempotency_key_used", s, e)
		}
	})
	t.Run("without the header every create makes a key", func(t *testing.T) {
		before := len(keys("acct_idem"))
		for range 2 {
			if s, _, _, _ := create("acct_idem", "", `{"name":"ci"}`); s != 201 {
				t.Fatalf("create without Idempotency-Key: %d", s)
			}
		}
		if got := len(keys("acct_idem")); got != before+2 {
			t.Fatalf("%d keys, want %d", got, before+2)
		}
	})
	t.Run("an Idempotency-Key that is too long or not printable is refused", func(t *testing.T) {
		for _, bad := range []string{strings.Repeat("k", 256), "a\tb", "caf\u00e9"} {
			if s, _, e, _ := create("acct_idem", bad, `{"name":"ci"}`); s != 400 || e.Code != "invalid_request" {
				t.Errorf("Idempotency-Key %q: %d %+v, want 400 invalid_request", bad, s, e)
			}
		}
	})
}
