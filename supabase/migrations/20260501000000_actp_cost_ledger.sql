-- EverReach cost ledger: the tables and functions behind cost_guard.py.
--
-- Apply it to a Supabase project with `supabase db push` or by pasting it into the SQL editor.
-- With DATABASE_URL / SUPABASE_DB_URL the orchestrator runs this same file itself at start-up.
-- Idempotent: safe to run again. Every write goes through the functions below, which keep the
-- per-month totals row in step with the log; do not write the tables by hand.
--
-- Why a totals row: reserve() must check "committed + reserved + amount <= cap" and insert in
-- one atomic step across every instance. Locking the month's row (SELECT ... FOR UPDATE)
-- serialises reservations of that month in the database itself, and reading two numbers from it
-- is O(1) where SUM over the month's log would grow with every call.

CREATE TABLE IF NOT EXISTS actp_cost_log (
    id           text PRIMARY KEY,            -- chosen by the caller: a retried reserve is a no-op
    created_at   timestamptz NOT NULL,
    month        text NOT NULL,               -- 'YYYY-MM' in the instance's EVERREACH_TZ
    action       text NOT NULL,
    cost_usd     numeric(18, 6) NOT NULL CHECK (cost_usd >= 0),   -- actual once committed
    reserved_usd numeric(18, 6) NOT NULL CHECK (reserved_usd >= 0),
    request_id   text NOT NULL,
    status       text NOT NULL CHECK (status IN ('reserved', 'committed', 'released')),
    expires_at   timestamptz NOT NULL,        -- a reservation still open then stops counting
    expired      boolean NOT NULL DEFAULT false,
    settled_at   timestamptz
);

CREATE INDEX IF NOT EXISTS actp_cost_log_month_action ON actp_cost_log (month, action);
-- Only open reservations are ever scanned for expiry: a tiny partial index.
CREATE INDEX IF NOT EXISTS actp_cost_log_open
    ON actp_cost_log (month, expires_at) WHERE status = 'reserved';

CREATE TABLE IF NOT EXISTS actp_cost_month (
    month         text PRIMARY KEY,
    committed_usd numeric(18, 6) NOT NULL DEFAULT 0,
    reserved_usd  numeric(18, 6) NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Supabase exposes the public schema over REST to the anon key: only the service role (which
-- bypasses row level security) and the owner may touch the ledger.
ALTER TABLE actp_cost_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE actp_cost_month ENABLE ROW LEVEL SECURITY;

CREATE OR REPLACE FUNCTION actp_cost_schema_version() RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT 3 $$;

CREATE OR REPLACE FUNCTION actp_cost_totals_json(p_month text, p_committed numeric,
                                                 p_reserved numeric) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    -- Money travels as text: a JSON number would be read back as a binary float.
    SELECT jsonb_build_object('month', p_month, 'committed_usd', p_committed::text,
                              'reserved_usd', p_reserved::text)
$$;

-- Expire the open reservations of one month whose deadline has passed. The caller holds the
-- month row's lock (always taken before any log row: one lock order, no deadlocks).
CREATE OR REPLACE FUNCTION actp_cost_expire_month(p_month text, p_now timestamptz)
RETURNS numeric LANGUAGE plpgsql AS $$
DECLARE
    v_expired numeric;
BEGIN
    WITH gone AS (
        UPDATE actp_cost_log
           SET status = 'released', expired = true, settled_at = p_now
         WHERE month = p_month AND status = 'reserved' AND expires_at <= p_now
        RETURNING cost_usd
    )
    SELECT coalesce(sum(cost_usd), 0) INTO v_expired FROM gone;
    IF v_expired > 0 THEN
        UPDATE actp_cost_month SET reserved_usd = reserved_usd - v_expired, updated_at = p_now
         WHERE month = p_month;
    END IF;
    RETURN v_expired;
END
$$;

CREATE OR REPLACE FUNCTION actp_cost_reserve(p_id text, p_month text, p_action text,
                                             p_cost_usd numeric, p_request_id text,
                                             p_cap_usd numeric, p_now timestamptz,
                                             p_ttl_s double precision)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_committed numeric;
    v_reserved numeric;
    v_status text;
BEGIN
    PERFORM 1 FROM actp_cost_month WHERE month = p_month FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO actp_cost_month (month) VALUES (p_month) ON CONFLICT (month) DO NOTHING;
        PERFORM 1 FROM actp_cost_month WHERE month = p_month FOR UPDATE;
    END IF;
    PERFORM actp_cost_expire_month(p_month, p_now);
    SELECT committed_usd, reserved_usd INTO v_committed, v_reserved
      FROM actp_cost_month WHERE month = p_month;

    SELECT status INTO v_status FROM actp_cost_log WHERE id = p_id;
    IF FOUND THEN  -- the same reservation asked again (a retried request): answer as before
        RETURN actp_cost_totals_json(p_month, v_committed, v_reserved)
               || jsonb_build_object('accepted', v_status <> 'released', 'repeated', true);
    END IF;

    IF v_committed + v_reserved + p_cost_usd > p_cap_usd THEN
        RETURN actp_cost_totals_json(p_month, v_committed, v_reserved)
               || jsonb_build_object('accepted', false);
    END IF;

    INSERT INTO actp_cost_log (id, created_at, month, action, cost_usd, reserved_usd,
                               request_id, status, expires_at)
    VALUES (p_id, p_now, p_month, p_action, p_cost_usd, p_cost_usd, p_request_id, 'reserved',
            p_now + make_interval(secs => p_ttl_s));
    v_reserved := v_reserved + p_cost_usd;
    UPDATE actp_cost_month SET reserved_usd = v_reserved, updated_at = p_now
     WHERE month = p_month;
    RETURN actp_cost_totals_json(p_month, v_committed, v_reserved)
           || jsonb_build_object('accepted', true);
END
$$;

-- Settle a reservation: commit it with what the call actually cost (p_cost_usd), or release it
-- (p_cost_usd NULL: the call provably did not run). Committing a reservation that already
-- expired (or was released) still records the spend: the call ran, so the money is gone.
-- Settling twice changes nothing.
CREATE OR REPLACE FUNCTION actp_cost_settle(p_id text, p_cost_usd numeric, p_now timestamptz)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_month text;
    v_status text;
    v_cost numeric;
    v_committed numeric;
    v_reserved numeric;
BEGIN
    SELECT month INTO v_month FROM actp_cost_log WHERE id = p_id;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('found', false);
    END IF;
    SELECT committed_usd, reserved_usd INTO v_committed, v_reserved
      FROM actp_cost_month WHERE month = v_month FOR UPDATE;
    SELECT status, cost_usd INTO v_status, v_cost FROM actp_cost_log WHERE id = p_id FOR UPDATE;
    IF v_status = 'committed' OR (p_cost_usd IS NULL AND v_status <> 'reserved') THEN
        RETURN actp_cost_totals_json(v_month, v_committed, v_reserved)
               || jsonb_build_object('found', true, 'changed', false, 'late', false);
    END IF;
    IF v_status = 'reserved' THEN
        v_reserved := v_reserved - v_cost;
    END IF;
    IF p_cost_usd IS NULL THEN
        UPDATE actp_cost_log SET status = 'released', settled_at = p_now WHERE id = p_id;
    ELSE
        v_committed := v_committed + p_cost_usd;
        UPDATE actp_cost_log SET status = 'committed', cost_usd = p_cost_usd, settled_at = p_now
         WHERE id = p_id;
    END IF;
    UPDATE actp_cost_month
       SET committed_usd = v_committed, reserved_usd = v_reserved, updated_at = p_now
     WHERE month = v_month;
    RETURN actp_cost_totals_json(v_month, v_committed, v_reserved)
           || jsonb_build_object('found', true, 'changed', true,
                                 'late', p_cost_usd IS NOT NULL AND v_status = 'released');
END
$$;

-- Expire stale reservations of every month (oldest first: one lock order) and return the
-- totals of p_month. The cheap call each instance makes every few seconds.
CREATE OR REPLACE FUNCTION actp_cost_totals(p_month text, p_now timestamptz)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_stale text;
    v_committed numeric := 0;
    v_reserved numeric := 0;
BEGIN
    FOR v_stale IN
        SELECT DISTINCT month FROM actp_cost_log
         WHERE status = 'reserved' AND expires_at <= p_now ORDER BY month
    LOOP
        PERFORM 1 FROM actp_cost_month WHERE month = v_stale FOR UPDATE;
        PERFORM actp_cost_expire_month(v_stale, p_now);
    END LOOP;
    SELECT committed_usd, reserved_usd INTO v_committed, v_reserved
      FROM actp_cost_month WHERE month = p_month;
    RETURN actp_cost_totals_json(p_month, coalesce(v_committed, 0), coalesce(v_reserved, 0));
END
$$;

-- Month-to-date spend per action (committed, plus what is still reserved), for /status.
CREATE OR REPLACE FUNCTION actp_cost_by_action(p_month text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_object_agg(action, jsonb_build_object(
               'committed_usd', committed::text, 'reserved_usd', reserved::text)), '{}'::jsonb)
      FROM (SELECT action,
                   sum(cost_usd) FILTER (WHERE status = 'committed') AS committed,
                   sum(cost_usd) FILTER (WHERE status = 'reserved') AS reserved
              FROM actp_cost_log
             WHERE month = p_month AND status <> 'released'
             GROUP BY action) AS per_action
$$;

-- Month-to-date spend per day (committed, plus what is still reserved), for the forecast.
-- p_day_starts: the instants the month's local days start, then the next month's first (the
-- caller's EVERREACH_TZ decides them); day n holds the calls made in [start n, start n+1).
CREATE OR REPLACE FUNCTION actp_cost_daily(p_month text, p_day_starts text[]) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_starts timestamptz[] := p_day_starts::timestamptz[];  -- cast once, not per row
BEGIN
    RETURN (SELECT coalesce(jsonb_object_agg(day, usd::text), '{}'::jsonb)
              FROM (SELECT width_bucket(created_at, v_starts) AS day, sum(cost_usd) AS usd
                      FROM actp_cost_log
                     WHERE month = p_month AND status <> 'released'
                     GROUP BY 1) AS per_day);
END
$$;

-- A log row as the guard's sweep and reports read it; money as text, like the totals.
CREATE OR REPLACE FUNCTION actp_cost_row_json(r actp_cost_log) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('id', r.id, 'month', r.month, 'action', r.action,
                              'request_id', r.request_id, 'reserved_usd', r.reserved_usd::text,
                              'cost_usd', r.cost_usd::text)
$$;

-- Reservations still open that were made before p_before, oldest first. Their process died
-- between the call and its commit: the guard asks the cloud whether each ran, then settles it.
CREATE OR REPLACE FUNCTION actp_cost_overdue(p_before timestamptz, p_limit integer)
RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(actp_cost_row_json(l) ORDER BY l.created_at), '[]'::jsonb)
      FROM (SELECT * FROM actp_cost_log WHERE status = 'reserved' AND created_at <= p_before
             ORDER BY created_at LIMIT p_limit) AS l
$$;

-- Calls of p_month that cost more than they reserved: each closes the month's budget.
CREATE OR REPLACE FUNCTION actp_cost_overruns(p_month text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(actp_cost_row_json(l) ORDER BY l.created_at), '[]'::jsonb)
      FROM actp_cost_log AS l
     WHERE l.month = p_month AND l.status = 'committed' AND l.cost_usd > l.reserved_usd
$$;

-- Only the owner and Supabase's service role may call these over REST.
REVOKE ALL ON FUNCTION actp_cost_reserve(text, text, text, numeric, text, numeric, timestamptz,
                                         double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION actp_cost_settle(text, numeric, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION actp_cost_totals(text, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION actp_cost_expire_month(text, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION actp_cost_by_action(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION actp_cost_daily(text, text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION actp_cost_overdue(timestamptz, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION actp_cost_overruns(text) FROM PUBLIC;

DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('REVOKE ALL ON actp_cost_log, actp_cost_month FROM %I', v_role);
            EXECUTE format('REVOKE ALL ON FUNCTION actp_cost_reserve(text, text, text, numeric, '
                           'text, numeric, timestamptz, double precision), '
                           'actp_cost_settle(text, numeric, timestamptz), '
                           'actp_cost_totals(text, timestamptz), '
                           'actp_cost_expire_month(text, timestamptz), '
                           'actp_cost_by_action(text), '
                           'actp_cost_daily(text, text[]), '
                           'actp_cost_overdue(timestamptz, integer), '
                           'actp_cost_overruns(text) FROM %I', v_role);
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        GRANT SELECT, INSERT, UPDATE ON actp_cost_log, actp_cost_month TO service_role;
        GRANT EXECUTE ON FUNCTION actp_cost_reserve(text, text, text, numeric, text, numeric,
                                                    timestamptz, double precision),
                                  actp_cost_settle(text, numeric, timestamptz),
                                  actp_cost_totals(text, timestamptz),
                                  actp_cost_expire_month(text, timestamptz),
                                  actp_cost_by_action(text),
                                  actp_cost_daily(text, text[]),
                                  actp_cost_overdue(timestamptz, integer),
                                  actp_cost_overruns(text) TO service_role;
    END IF;
END
$$;
