"""Clinician and operator authentication, patient assignments and the authorization rules."""
