package postgres

import "time"

// SetFinalWait sets how long w's Close keeps trying to write what is
// pending, so a test of a database that never comes back need not wait
// the 10 s.
func SetFinalWait(w *AuditWriter, d time.Duration) { w.finalWait = d }
