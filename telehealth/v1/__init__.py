"""Generated from proto/telehealth/v1 by make proto; never edit."""
