"""The inventory: hosts.yml's schema (model), its loading (load), its error messages and YAML reading."""
from runbook.errors import InventoryError
from runbook.inventory.load import load_inventory
from runbook.inventory.model import LOCAL, ROLES, Host, Inventory

__all__ = ["InventoryError", "load_inventory", "LOCAL", "ROLES", "Host", "Inventory"]
