"""Reporting: tables, figures, findings, the choice on val, published claims and README blocks."""
