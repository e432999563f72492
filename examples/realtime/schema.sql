-- Tables the real-time examples read and write (PostgreSQL).
-- The CDC connector captures orders, products and users; the database
-- connectors write messages, price_updates and audit_log.

CREATE TABLE orders (
  id         int PRIMARY KEY,
  user_id    int NOT NULL,
  status     text NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
-- DELETE events then carry the whole old row (user_id for the filter of
-- live_order_updates), not only the key.
ALTER TABLE orders REPLICA IDENTITY FULL;

CREATE TABLE products (id int PRIMARY KEY, name text);
CREATE TABLE users (id int PRIMARY KEY, name text);

-- handle_ws_message: the data of a WebSocket message frame.
CREATE TABLE messages (channel_id int, text text);

-- react_to_price_change: the priceChanged value of the other service.
CREATE TABLE price_updates (sku text, cents int);

-- audit_updates: a users.UPDATE change event, every field of it.
CREATE TABLE audit_log (
  seq              bigserial PRIMARY KEY,
  id               int,
  name             text,
  _operation       text,
  _table           text,
  _schema          text,
  _old             jsonb,
  _unchanged_toast jsonb,
  _lsn             text,
  _commit_lsn      text,
  _commit_time     timestamptz,
  _xid             bigint
);
