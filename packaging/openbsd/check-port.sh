#!/bin/sh
echo "port check: stub"
