-- One transfer as the harness's direct path runs it (services/eventstore.py): one
-- read of both heads, then one cdc_append with the ids in account order, the
-- versions just read, the deltas and the event types. Both statements autocommit.
--
--   pgbench -n -M prepared --max-tries 5 -D accounts=1000 -D max_amount=5000 \
--     -f scripts/bench_transfer.sql -c 10 -T 15 "$DATABASE_URL"
--
-- A head moved by another client makes cdc_append raise SQLSTATE 40001; pgbench
-- then runs the script again with the same random values (--max-tries), as the
-- harness re-reads and retries a bounded number of times. A source balance below
-- the amount skips the append, as the harness's planner refuses an overdraft.
-- \gset needs exactly one row, so the read folds the two heads into one row; it
-- reads the same rows through the same index as the harness's read.

\set a random(1, :accounts)
\set b 1 + (:a + random(0, :accounts - 2)) % :accounts
\set amount random(1, :max_amount)
\set debit -:amount
SELECT max(version) FILTER (WHERE account_id = :a) AS va,
       max(version) FILTER (WHERE account_id = :b) AS vb,
       max(balance) FILTER (WHERE account_id = :a) AS funds
  FROM accounts WHERE account_id = ANY (ARRAY[:a, :b]::bigint[]) \gset
\if :funds >= :amount
\if :a < :b
SELECT cdc_append(gen_random_uuid(), ARRAY[:a, :b]::bigint[],
    ARRAY[:va, :vb]::integer[], ARRAY[:debit, :amount]::bigint[],
    '{TransferDebited,TransferCredited}'::text[]);
\else
SELECT cdc_append(gen_random_uuid(), ARRAY[:b, :a]::bigint[],
    ARRAY[:vb, :va]::integer[], ARRAY[:amount, :debit]::bigint[],
    '{TransferCredited,TransferDebited}'::text[]);
\endif
\endif
