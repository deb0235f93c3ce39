"""Shared code of every telehealth-mesh process."""
