"""The application as the user builds it: deployments, their options, the bound graph,
config files and import paths. Pure data and validation; nothing here starts a replica."""
