"""The ``database`` connector: payloads become rows.

``to { connector = "db"  target = "messages" }`` inserts each payload (a
JSON object) as one row of ``messages``: every key names a column, and a
key that is not a column of the table fails that event with an error naming
it, except keys starting with ``_`` (event metadata, such as CDC's
``_lsn``), which are skipped when no column has their name (the ``to``
block's ``extra_keys`` changes this). Columns the payload leaves out get
their defaults.

The target grammar is ``TABLE``, ``INSERT TABLE`` or ``UPSERT TABLE``;
``UPSERT`` updates the row whose conflict key (the to block's ``key``, or
the table's primary key) matches, and inserts otherwise. The table's
columns are read from the database on first use and cached; the cache is
dropped for a table whenever a write into it fails, so that a column added
while Mycel runs is found again.

Deliveries that come together (:meth:`DatabaseConnector.deliver_many`,
when a source hands a flow several events at once) are written together:
each row is made first, and the rows of one statement go to the batcher as
one unit, in one transaction, awaited with one future; each event still
succeeds only once its row committed.

Known limitations: rows of one table written with different column sets go
out in different batches (of one ``deliver_many`` call, each run of
consecutive rows with the same columns is one unit, written after the one
before it); batches of one table may commit in a different order than
their deliveries began when ``pool_size`` allows several in flight (an
ordered source such as CDC hands over one batch at a time and waits for
it, so its order holds); there is no ``UPDATE`` or ``DELETE`` target.

"""

from __future__ import annotations

import asyncio
import operator
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from mycel import (
    Connector,
    ConnectorError,
    Delivery,
    DeliveryError,
    Operation,
    Settings,
)

from ._backend import Backend, Batcher, Converter, TableInfo
from ._postgres import PostgresBackend
from ._settings import DatabaseSettings, DatabaseToOptions
from ._sqlite import SqliteBackend
from ._statement import Statement, TableName, TargetSpec, parse_target

__all__ = ["DatabaseConnector"]

_MAX_PLANS = 10_000
_MAX_KINDS = 64


def _plan_key(delivery: Delivery, payload: Mapping[str, Any]) -> tuple[Any, ...]:
    """What the plan for ``payload`` is cached under."""
    return (delivery.target, delivery.operation, id(delivery.options), tuple(payload))


class _Plan:
    """How payloads with one set of keys become rows of one statement."""

    __slots__ = (
        "_checked",
        "_clean",
        "_converters",
        "_get",
        "every_key",
        "fields",
        "info",
        "statement",
    )

    def __init__(
        self,
        statement: Statement,
        fields: tuple[tuple[str, Converter | None], ...],
        info: TableInfo,
        every_key: bool,
    ) -> None:
        self.statement = statement
        self.fields = fields
        self.info = info
        self.every_key = every_key
        """Whether every key of the payload is a field (none is skipped)."""
        names = [name for name, _ in fields]
        self._get: Callable[[Mapping[str, Any]], tuple[Any, ...]]
        if len(names) == 1:
            name = names[0]
            self._get = lambda payload: (payload[name],)
        elif names:
            self._get = operator.itemgetter(*names)
        else:
            self._get = lambda payload: ()
        self._converters = tuple(convert for _, convert in fields)
        self._checked = tuple(
            (position, convert)
            for position, (_, convert) in enumerate(fields)
            if convert is not None
        )
        """The fields whose values may need converting, by position."""
        self._clean: dict[tuple[type, ...], bool] = {}
        """Per tuple of value types: whether the values go as they are."""

    def rows(self, payloads: Sequence[Any]) -> list[tuple[Any, ...]] | None:
        """The rows of ``payloads``, made column by column; or None.

        None unless each payload is a dict with exactly this plan's keys
        (in any order) and no value needs converting: then :meth:`row` is
        for each payload. Checking a column's value types in one go costs
        a fraction of checking each row's.

        """
        if not self.every_key or set(map(type, payloads)) != {dict}:
            return None
        if set(map(len, payloads)) != {len(self.fields)}:
            return None
        try:
            rows = list(map(self._get, payloads))
        except KeyError:  # as many keys, not the same ones
            return None
        for position, convert in self._checked:
            kinds = set(map(type, map(operator.itemgetter(position), rows)))
            if not kinds <= convert.exact:
                return None
        return rows

    def row(self, payload: Mapping[str, Any]) -> tuple[Any, ...]:
        """The row for ``payload``; ValueError if a value cannot be bound.

        Values whose type the column takes as it is (an int for an integer
        column, a str for a text one) are not converted; the verdict is kept
        per combination of value types, so the common row costs one lookup.

        """
        values = self._get(payload)
        kinds = tuple(map(type, values))
        clean = self._clean.get(kinds)
        if clean is None:
            clean = all(
                convert is None or kind in convert.exact
                for kind, convert in zip(kinds, self._converters, strict=True)
            )
            if len(self._clean) < _MAX_KINDS:
                self._clean[kinds] = clean
        if clean:
            return values
        return tuple(
            value
            if convert is None or type(value) in convert.exact
            else convert.convert(value)
            for value, convert in zip(values, self._converters, strict=True)
        )


def _conversion_failed(
    plan: _Plan, payload: Mapping[str, Any], error: ValueError
) -> DeliveryError:
    failure = DeliveryError(_conversion_error(plan, payload), permanent=True)
    failure.__cause__ = error
    return failure


def _conversion_error(plan: _Plan, payload: Mapping[str, Any]) -> str:
    # Find the field that failed again, to name it in the message.
    for name, convert in plan.fields:
        if convert is None:
            continue
        try:
            convert.convert(payload[name])
        except ValueError as exc:
            return f"table {str(plan.statement.table)!r} column {name!r}: {exc}"
    return f"table {str(plan.statement.table)!r}: a value cannot be converted"


_metrics: weakref.WeakKeyDictionary[CollectorRegistry, tuple[Counter, Counter]] = (
    weakref.WeakKeyDictionary()
)


def _counters(registry: CollectorRegistry) -> tuple[Counter, Counter]:
    # One pair per registry, shared by every database connector in it.
    found = _metrics.get(registry)
    if found is None:
        found = (
            Counter(
                "mycel_database_batches",
                "Transactions written by database targets",
                ["connector"],
                registry=registry,
            ),
            Counter(
                "mycel_database_rows",
                "Rows committed by database targets",
                ["connector"],
                registry=registry,
            ),
        )
        _metrics[registry] = found
    return found


class DatabaseConnector(Connector):
    """Rows into PostgreSQL or SQLite; see the module docstring."""

    type_name = "database"
    settings_model = DatabaseSettings
    target_operations = (
        Operation("insert", "insert the payload as a row of `target`"),
        Operation("upsert", "insert, or update the row with the same key"),
    )
    default_operation = "insert"
    target_required = True
    to_options = DatabaseToOptions

    @classmethod
    def check_target(cls, settings: Settings, target: str) -> list[str]:
        """Refuse a target outside the grammar when the configuration loads."""
        try:
            parse_target(target)
        except ValueError as exc:
            return [str(exc)]
        return []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.settings, DatabaseSettings)
        self._settings: DatabaseSettings = self.settings
        self._backend: Backend
        if self._settings.driver == "postgres":
            self._backend = PostgresBackend(self._settings)
        else:
            assert self._settings.database is not None
            self._backend = SqliteBackend(
                self._settings.database,
                self.services.base_dir,
                self._settings.connect_timeout,
            )
        self._batcher = Batcher(self._backend, self._settings.batch_size)
        self._targets: dict[str, TargetSpec] = {}
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._tables: dict[TableName, asyncio.Task[TableInfo | None]] = {}
        batches, rows = _counters(self.services.metrics.registry)
        self._batches = batches.labels(self.name)
        self._rows = rows.labels(self.name)
        self._batcher.on_batch = self._count_batch

    def _count_batch(self, rows: int) -> None:
        self._batches.inc()
        self._rows.inc(rows)

    async def start(self) -> None:
        settings = self._settings
        try:
            await self._backend.start()
        except Exception as exc:  # driver boundary: any failure to connect
            raise ConnectorError(
                f"database {self.name!r}: cannot connect ({settings.driver}): {exc}"
            ) from exc
        where = (
            settings.database
            if settings.driver == "sqlite"
            else self.describe().get("connection_string") or settings.host or "default"
        )
        self.services.logger.info(
            "database %r: connected to %s %s", self.name, settings.driver, where
        )
        await self._run_init_sql()

    async def _run_init_sql(self) -> None:
        scripts: list[tuple[str, str]] = []
        if self._settings.init_sql_file is not None:
            path = self.services.base_dir / self._settings.init_sql_file
            try:
                scripts.append((str(path), path.read_text(encoding="utf-8")))
            except OSError as exc:
                raise ConnectorError(
                    f"database {self.name!r}: cannot read init_sql_file: {exc}"
                ) from exc
        if self._settings.init_sql is not None:
            scripts.append(("init_sql", self._settings.init_sql))
        for where, sql in scripts:
            try:
                await self._backend.run_script(sql)
            except Exception as exc:  # driver boundary: report the user's SQL
                await self._backend.close()
                raise ConnectorError(
                    f"database {self.name!r}: {where} failed: {exc}"
                ) from exc

    async def close(self) -> None:
        await self._batcher.close()
        await self._backend.close()

    async def deliver(self, delivery: Delivery) -> None:
        plan, row = await self._row(delivery)

        # Write it with whatever else is going into the same statement.
        try:
            await self._batcher.write(plan.statement, row)
        except DeliveryError:
            self._forget(plan.statement.table)
            raise

    async def deliver_many(
        self, deliveries: Sequence[Delivery]
    ) -> list[BaseException | None]:
        """Write the rows of several deliveries, a group per statement.

        Each group goes to the batcher as one unit, awaited with one future.
        A delivery whose row cannot be made (not an object, a key naming no
        column, a value the column refuses) fails on its own before
        anything is written; a row the database refuses fails on its own
        too, as the batcher writes the rows of a failed batch one by one.

        """
        # The common case: one flow's events of one shape, values as they
        # are; their rows are made in one go and written as one unit.
        plan = self._known_plan(deliveries)
        if plan is not None:
            rows = plan.rows([delivery.payload for delivery in deliveries])
            if rows is not None:
                errors = await self._batcher.write_many(plan.statement, rows)
                if any(error is not None for error in errors):
                    self._forget(plan.statement.table)
                return errors

        # Make each row, grouped by plan (rows of one plan share a statement)
        # where consecutive rows have the same plan, so that the groups keep
        # the deliveries' order; the plan is cached per shape of payload.
        outcomes: list[BaseException | None] = [None] * len(deliveries)
        groups: list[tuple[_Plan, list[int], list[tuple[Any, ...]]]] = []
        plans = self._plans
        for index, delivery in enumerate(deliveries):
            payload = delivery.payload
            plan = (
                plans.get(_plan_key(delivery, payload))
                if type(payload) is dict
                else None
            )
            try:
                if plan is None:
                    plan, row = await self._row(delivery)
                else:
                    row = plan.row(payload)
            except ValueError as exc:
                assert plan is not None
                outcomes[index] = _conversion_failed(plan, payload, exc)
                continue
            except DeliveryError as exc:
                outcomes[index] = exc
                continue
            if not groups or groups[-1][0] is not plan:
                groups.append((plan, [], []))
            groups[-1][1].append(index)
            groups[-1][2].append(row)

        # Write the groups, each as one unit of the batcher, one after the
        # other: rows of one batch commit in the order they were handed over.
        for plan, indexes, rows in groups:
            errors = await self._batcher.write_many(plan.statement, rows)
            if any(error is not None for error in errors):
                self._forget(plan.statement.table)
            for index, error in zip(indexes, errors, strict=True):
                outcomes[index] = error
        return outcomes

    def _known_plan(self, deliveries: Sequence[Delivery]) -> _Plan | None:
        """The first delivery's cached plan, if every delivery goes where it goes."""
        first = deliveries[0]
        if len(deliveries) == 1 or type(first.payload) is not dict:
            return None
        plan = self._plans.get(_plan_key(first, first.payload))
        if plan is None:
            return None
        target, operation, options = first.target, first.operation, first.options
        if all(
            delivery.target == target
            and delivery.operation == operation
            and delivery.options is options
            for delivery in deliveries
        ):
            return plan
        return None

    async def _row(self, delivery: Delivery) -> tuple[_Plan, tuple[Any, ...]]:
        """The delivery's plan and its row, converted for the driver."""
        payload = delivery.payload
        if not isinstance(payload, Mapping):
            table = self._target(delivery.target).table
            raise DeliveryError(
                f"table {str(table)!r}: the payload must be an object, "
                f"not {type(payload).__name__}",
                permanent=True,
            )

        # How this shape of payload goes into its table, worked out once.
        plan_key = _plan_key(delivery, payload)
        plan = self._plans.get(plan_key)
        if plan is None:
            plan = await self._plan(delivery, payload)
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[plan_key] = plan

        try:
            return plan, plan.row(payload)
        except ValueError as exc:
            raise _conversion_failed(plan, payload, exc) from exc

    def _forget(self, table: TableName) -> None:
        # A write failed: the table may have changed under us, so read its
        # columns again before the next row goes there.
        self._tables.pop(table, None)
        self._plans.clear()

    async def _plan(self, delivery: Delivery, payload: Mapping[str, Any]) -> _Plan:
        # Which table, and insert or upsert.
        spec = self._target(delivery.target)
        table = spec.table
        verb = spec.verb or ("upsert" if delivery.operation == "upsert" else "insert")
        if spec.verb == "insert" and delivery.operation == "upsert":
            raise DeliveryError(
                f"operation 'upsert' contradicts target {delivery.target!r}",
                permanent=True,
            )

        # Map the payload's keys on the table's columns, in table order.
        options = delivery.options
        extra = options.extra_keys if isinstance(options, DatabaseToOptions) else None
        info = await self._table_info(table, payload, extra or "metadata")
        columns = tuple(name for name in info.columns if name in payload)
        key: tuple[str, ...] = ()
        if verb == "upsert":
            key = self._conflict_key(info, delivery.options)
        fields = tuple(
            (name, self._backend.converter(info.columns[name])) for name in columns
        )
        statement = Statement(table, verb, columns, key)
        return _Plan(statement, fields, info, len(columns) == len(payload))

    def _target(self, target: str | None) -> TargetSpec:
        spec = self._targets.get(target or "")
        if spec is None:
            try:
                spec = parse_target(target or "")
            except ValueError as exc:
                raise DeliveryError(str(exc), permanent=True) from exc
            if len(self._targets) < 10_000:
                self._targets[target or ""] = spec
        return spec

    async def _table_info(
        self, table: TableName, payload: Mapping[str, Any], extra_keys: str
    ) -> TableInfo:
        """The table's columns, once every key of ``payload`` may go there.

        Which keys must name a column depends on ``extra_keys`` (see
        :class:`DatabaseToOptions`); a key that must and does not is a
        permanent error naming it, after the columns were read again once.

        """
        if extra_keys == "ignore":
            payload = {}
        elif extra_keys == "metadata":
            payload = {name: None for name in payload if not name.startswith("_")}

        # The common case: columns known, every key one of them.
        task = self._tables.get(table)
        if task is not None and task.done() and not task.cancelled():
            known = task.result() if task.exception() is None else None
            if known is not None and all(name in known.columns for name in payload):
                return known

        for attempt in range(2):
            task = self._tables.get(table)
            if task is None:
                task = asyncio.ensure_future(self._backend.table_info(table))
                self._tables[table] = task
            try:
                info = await asyncio.shield(task)
            except DeliveryError:
                self._tables.pop(table, None)
                raise
            if info is None:
                self._tables.pop(table, None)
                raise DeliveryError(
                    f"table {str(table)!r} does not exist", permanent=True
                )
            unknown = [name for name in payload if name not in info.columns]
            if not unknown:
                return info
            # Columns may have been added since they were read: read again once.
            if attempt == 0:
                self._tables.pop(table, None)
        names = ", ".join(repr(name) for name in unknown)
        noun = "column" if len(unknown) == 1 else "columns"
        raise DeliveryError(
            f"table {str(table)!r} has no {noun} {names}", permanent=True
        )

    def _conflict_key(
        self, info: TableInfo, options: Settings | None
    ) -> tuple[str, ...]:
        given = options.key if isinstance(options, DatabaseToOptions) else None
        key = tuple(given) if given else info.primary_key
        if not key:
            raise DeliveryError(
                f"UPSERT into table {str(info.table)!r} needs a conflict key: "
                "the table has no primary key; add key = [...] to the to block",
                permanent=True,
            )
        missing = [name for name in key if name not in info.columns]
        if missing:
            raise DeliveryError(
                f"key column {missing[0]!r} is not a column of table "
                f"{str(info.table)!r}",
                permanent=True,
            )
        return key
