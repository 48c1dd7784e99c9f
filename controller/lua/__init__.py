"""Lua scripts of the controller (package data), one per Redis operation."""
