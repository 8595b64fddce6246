package aggregator

import (
	"context"

	"github.com/tollgate-dev/tollgate/schemas"
)

// SpoolHolds reads the edges' spool holds. The usage API only reads them:
// retiring a released hold is the invoicer's work.
type SpoolHolds interface {
	SpoolHolds(ctx context.Context) ([]schemas.SpoolHold, error)
}
