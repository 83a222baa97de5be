"""Importable row filters for tests of ``data.filter`` (resolved from a dotted path by jsonargparse)."""


def high_white_elo(row: dict) -> bool:
    return row["WhiteElo"] >= 1400
