"""The run configs shipped with supsup, installed as the package data of ``supsup.configs``:
``supsup configs`` lists them, ``supsup run NAME`` runs one."""
